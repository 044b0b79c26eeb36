"""Every fine-tuning knob with its default; configs/finetune/*.py start from `get_config()` here."""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  # config.model is replaced by the pretrained run's at start, but for how it is computed (model.dtype, remat,
  # remat_policy, scan_layers, attention_impl), which are this config's: --config.model.dtype=bfloat16 fine-tunes
  # a float32 base in mixed precision.
  config = base.get_config()
  with config.unlocked():
    config.init_from = ""             # workdir of the pretrained run (required)
    config.init_step = -1             # its checkpoint step (-1 = latest; pinned in config.json)
    config.task = "classify"          # lm | instruct | classify | preference
    config.peft = peft = ml_collections.ConfigDict()
    peft.method = "full"              # full | freeze | lora | ia3 | prompt
    peft.trainable = ()               # freeze: regexes over parameter paths such as "layer_3/mlp/wi_bias"
    peft.lora_rank = 8                # lora: rank r
    peft.lora_alpha = 16.0            # lora: the update is scaled by alpha / r
    peft.lora_dropout = 0.0           # lora: dropout on A's input features (one mask per step)
    peft.lora_targets = (r"attention/(query|value)$",)  # lora: regexes of the kernels to adapt
    peft.num_prompt_tokens = 20       # prompt: virtual tokens prepended to every input
    config.preference = preference = ml_collections.ConfigDict()  # the preference task (train/preference.py)
    preference.loss = "dpo"           # dpo (Rafailov et al.) | ipo (Azar et al.) | simpo (Meng et al.: no reference)
    preference.beta = 0.1             # dpo / ipo: the KL strength (ipo's tau); simpo: the reward scale (~2)
    preference.label_smoothing = 0.0  # dpo: the assumed share of flipped labels (conservative DPO; 0 = plain)
    preference.gamma = 0.5            # simpo: the target reward margin
    preference.reference = "model"    # model (adapters off; a frozen copy of the base parameters that train)
                                      # | precomputed (the reference's log-probs of every row, once, in the workdir)
    preference.eval_prompts = 0       # held-out prompts sampled at each eval for eval/kl (and eval/reward; 0 = none)
    preference.sample_tokens = 32     # eval samples: new tokens at most
    preference.sample_temperature = 1.0  # eval samples: temperature (eval/kl is unbiased at 1)
    preference.reward_from = ""       # a classification run whose P(reward_label | prompt + sample) is eval/reward
    preference.reward_label = "1"     # the label of reward_from whose probability is the reward
    config.data.prompt_field = "prompt"       # preference: JSONL field of the prompt ({prompt} in the template)
    config.data.chosen_field = "chosen"       # preference: JSONL field of the preferred response
    config.data.rejected_field = "rejected"   # preference: JSONL field of the other response
    config.data.label_field = "label"         # classify: JSONL field of the label
    config.data.prompt_template = "{prompt}"  # instruct, preference: str.format template over the record's fields
    config.data.response_field = "response"   # instruct: JSONL field of the target text
    config.data.prompt_as_prefix = False      # instruct, decoder: read [bos] + prompt bidirectionally (prefix LM)
    config.data.max_records = 0               # read at most this many JSONL records per split (0 = all)
  config.data.train_path = ""
  config.train.update(steps=500, batch_size=32, seq_len=128, learning_rate=1e-4, min_learning_rate=1e-5,
                      warmup_steps=50, weight_decay=0.0, eval_every=100, eval_batches=1000,
                      checkpoint_every=500, num_samples=0)
  return config
