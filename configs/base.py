"""Every knob of an ablax experiment with its default. Other configs start from `get_config()` here."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  config.objective = "causal_lm"      # causal_lm | prefix_lm (decoder) | masked_lm (encoder)
                                      # | span_corruption (encoder_decoder)

  config.model = model = ml_collections.ConfigDict()
  model.family = "decoder"            # decoder (GPT / Llama) | encoder (BERT) | encoder_decoder (T5)
  model.num_layers = 4                # transformer blocks
  model.d_model = 256                 # residual stream width D
  model.num_heads = 4                 # query heads H
  model.num_kv_heads = 0              # key/value heads G (0 = num_heads; 1 = multi-query; else grouped-query)
  model.head_dim = 0                  # per-head width K (0 = d_model // num_heads)
  model.mlp_dim = 0                   # MLP hidden width F (0 = 4 * d_model)
  model.activation = "gelu"           # gelu (exact erf) | gelu_tanh | relu | swiglu | geglu (tanh-GELU gate, T5 v1.1)
  model.norm = "layernorm"            # layernorm | rmsnorm
  model.norm_position = "pre"         # pre (GPT-2) | post (original Transformer / BERT)
  model.norm_eps = 1e-5               # epsilon of the norms (PyTorch's LayerNorm default)
  model.position = "learned"          # sinusoidal | learned | rope | alibi | relative (T5 bias) | none
  model.max_len = 1024                # rows of the learned position table
  model.rope_theta = 10_000.0         # RoPE base frequency
  model.relative_buckets = 32         # relative: buckets of the per-stack [buckets, heads] bias table
  model.relative_max_distance = 128   # relative: offsets this far or farther share the last bucket
  model.scale_attention = True        # divide attention logits by sqrt(head_dim) (T5: False)
  model.qk_norm = False               # RMSNorm of queries and keys before RoPE (QK-norm: Qwen3, OLMo-2, Gemma 3)
  model.qk_norm_scope = "head"        # qk_norm over: head (each head's K, a scale [K]: Qwen3, Gemma 3) | projection
                                      # (all heads' H*K at once, a scale [H*K]: OLMo-2)
  model.attention_impl = "einsum"     # einsum (explicit products) | dot_product (jax.nn.dot_product_attention)
                                      # | splash (TPU flash attention) | cudnn (GPU flash attention; bf16 / f16):
                                      # fused kernels, O(L) memory, not for alibi / relative, dropout, prefix LM
                                      # (model/flash.py; on CPU they run interpreted: slow)
  model.embed_norm = False            # normalise the embedding sum before the blocks (BERT)
  model.tie_embeddings = True         # output head = token embedding transposed
  model.scale_tied_logits = False     # tied head sees the output times d_model**-0.5 (T5 v1.0)
  model.head_transform = False        # dense D->D, activation, norm before the output head (BERT's MLM head)
  model.head_bias = False             # a bias on the vocabulary logits (BERT)
  model.parametrization = "sp"        # sp (standard) | mup: µP's init, Adam rates, multipliers (model/parametrization.py)
  model.base_width = 0                # µP: the d_model where mup equals sp and rates are tuned (0 = d_model); the
                                      # base model derives head_dim / mlp_dim from it when they are 0 here
  # The base model's multipliers, tuned at the base width with the rate (Tensor Programs V); they act under sp too:
  model.mup_output_mult = 1.0         # alpha_output: the logits x this (under mup x this / (d_model / base_width))
  model.mup_init_mult = 1.0           # the init std of hidden matrices (attention, MLP, head transform) x this
  model.mup_attn_mult = 1.0           # the attention logits x this
  model.mup_embed_lr_mult = 1.0       # the updates of embeddings and the untied readout x this
  model.mup_vector_lr_mult = 1.0      # the updates of vector-like parameters (norm scales, biases) x this
  model.mup_zero_query = False        # the query kernel starts at 0 (uniform attention at init)
  model.use_bias = True               # biases in dense layers and LayerNorm
  model.dropout = 0.0                 # dropout on embeddings, attention probabilities and residual branches
  model.dtype = "float32"             # compute dtype: float32 | bfloat16 (params stay in param_dtype)
  model.param_dtype = "float32"       # storage dtype of parameters and optimizer state
  model.remat = False                 # rematerialise each block in the backward pass (less memory, more FLOPs)
  model.remat_policy = "full"         # what remat keeps: full (nothing: least memory) | dots (matmul outputs
                                      # except attention scores) | dots_all (every matmul output)
  model.scan_layers = False           # run the blocks as one lax.scan (compiled once: fast compiles of deep
                                      # models); parameters and checkpoints are the same either way
  # Mixture of experts (model/moe.py; README "Mixture of experts"):
  model.mlp = "dense"                 # dense (one MLP a layer) | moe (a router picks experts_per_token experts)
  model.num_experts = 8               # moe: experts E a layer, each an MLP of mlp_dim
  model.experts_per_token = 2         # moe: experts X each token is sent to (top-X)
  model.moe_every = 1                 # moe: every n-th layer is a mixture (2: layers 1, 3, ...), the others dense
  model.shared_experts = 0            # moe: experts every token passes through too (a dense MLP of n * mlp_dim)
  model.router = "softmax_topk"       # moe: softmax_topk (Mixtral: top-X probabilities renormalised) | sigmoid_topk
                                      # (DeepSeek-V3: sigmoid affinities, the top X normalised); top-1: ungated by 1
  model.moe_capacity_factor = 0.0     # moe: 0 = dropless (grouped matmuls); c > 0: each row gives an expert
                                      # ceil(c * L * X / E) slots and drops the pairs past them (counted)
  model.moe_aux_loss = 0.01           # moe: coefficient of the Switch load-balancing loss (1 when balanced; 0 = off)
  model.router_z_loss = 0.0           # moe: coefficient of the router z-loss, mean log(Z)^2 of its logits (ST-MoE 1e-3)
  model.moe_bias_update_rate = 0.0    # moe: auxiliary-loss-free balancing (DeepSeek-V3 1e-3): a per-expert bias on the
                                      # choice moves by this towards balance each step (0 = no bias)

  config.data = data = ml_collections.ConfigDict()
  data.train_path = "builtin:python_stdlib"  # file, glob, directory, comma list, or builtin:python_stdlib
  data.val_path = ""                  # optional validation source; "" = split off val_fraction of train_path
  data.val_fraction = 0.1             # share of documents (or of the text, for one document) held out
  data.text_field = "text"            # field holding the text in JSONL records
  data.max_bytes = 0                  # read at most this many bytes of documents (0 = all)
  data.encoding_errors = "strict"     # bytes that are not UTF-8: strict (an error naming file and byte offset)
                                      # | replace (U+FFFD) | ignore
  data.tokenizer = "sentencepiece"    # sentencepiece | char | huggingface (an imported tokenizer.json)
                                      # | none (an imported model without a tokenizer: token ids only)
  data.framing = ""                   # how the run reads a text (prompts, scored contexts, fine-tuning rows): ""
                                      # = [bos] + text, as pretraining opens each document; python -m train.hf
                                      # import records its tokenizer's, e.g. "$A" (GPT-2) or "<s> $A" (Llama)
  data.vocab_size = 4096              # sentencepiece vocabulary size (char: the corpus' characters + 3)
  data.spm_model_type = "bpe"         # bpe | unigram
  data.tokenizer_train_chars = 20_000_000  # characters of training text fed to the sentencepiece trainer
  data.prepared = ""                  # a corpus prepared by python -m data.prepare (DIR), or a mixture of several
                                      # ("DIR1=0.9,DIR2=0.1"): read instead of train_path / val_path
  data.seed = -1                      # the data order (and masked_lm / span_corruption's static corruption; validation:
                                      # seed + 1); -1: the order follows train.seed and the corruption uses 0
  data.target_len = 0                 # decoder length of span_corruption (0 = seq_len / 4 rounded up to a multiple
                                      # of 8) and of instruct on an encoder-decoder (0 = seq_len)

  config.train = train = ml_collections.ConfigDict()
  train.steps = 1000                  # optimizer steps
  train.batch_size = 32               # global batch size in sequences (all microbatches together)
  train.seq_len = 256                 # tokens per sequence
  train.grad_accum = 1                # microbatches per step (batch_size must divide by it)
  train.optimizer = "adamw"           # adamw | lion | adafactor | muon (hidden matrices; AdamW for the rest)
                                      # | schedule_free_adamw (train/optimizers.py says what each computes)
  train.learning_rate = 1e-3          # peak learning rate (muon: of both parts; lion: some 3-10x below AdamW's)
  train.min_learning_rate = 1e-4      # learning rate at the end of the decay (cosine, linear, wsd)
  train.warmup_steps = 100            # linear warmup from 0 (every schedule)
  train.schedule = "cosine"           # cosine | linear (decay to min_learning_rate at decay_steps) | constant
                                      # | wsd (warmup, stable, then a cooldown over the last decay_fraction)
  train.decay_steps = 0               # where the decay ends, counted from step 0 (0 = the steps of the run's first
                                      # start: extending a run keeps its schedule; set it to decay over a new length)
  train.decay_fraction = 0.2          # wsd: share of decay_steps in the final cooldown
  train.decay_shape = "sqrt"          # wsd: the cooldown's shape: linear | sqrt (1 - sqrt(t), Hägele et al. 2024)
  train.b1 = 0.9                      # AdamW beta1 (also Muon's AdamW part; schedule_free_adamw: its interpolation)
  train.b2 = 0.95                     # AdamW beta2 (also Muon's AdamW part and schedule_free_adamw)
  train.eps = 1e-8                    # AdamW epsilon (also Muon's and schedule_free_adamw's)
  train.weight_decay = 0.1            # decoupled weight decay, times the learning rate, every optimizer
  train.decay_exclude = "norms_biases"  # leaves weight decay skips: norms_biases | norms_biases_embeddings (also
                                      # token / position tables and the output head) | none (decay everything)
  train.lion_b1 = 0.9                 # lion: interpolation of momentum and gradient in the signed update
  train.lion_b2 = 0.99                # lion: momentum decay
  train.adafactor_decay_rate = 0.8    # adafactor: second-moment decay exponent (beta2_t = 1 - t^-0.8)
  train.adafactor_clipping = 1.0      # adafactor: clip each update's RMS at this (0 = off)
  train.adafactor_momentum = 0.0      # adafactor: first-moment decay (0 = none, as the paper)
  train.adafactor_factored = True     # adafactor: row and column second moments for matrices of dims >= 128
  train.adafactor_parameter_scale = False  # adafactor: step relative to each parameter's RMS (T5; rates ~1e-2)
  train.muon_beta = 0.95              # muon: Nesterov momentum decay
  train.muon_ns_steps = 5             # muon: Newton-Schulz iterations of the orthogonalisation
  train.muon_rms = 0.2                # muon: update RMS of the matrices, as AdamW's (Moonlight's 0.2 sqrt(max dim))
  train.muon_per_head = False         # muon: orthogonalise each head's [D, K] (False: q, k, v, out whole)
  train.schedule_free_weight_lr_power = 2.0  # schedule_free_adamw: the average weights step t by lr(t)^power
  train.grad_clip = 1.0               # global-norm clip (0 = off)
  train.z_loss = 0.0                  # PaLM's z-loss: adds z_loss * log(Z)^2 a token (Z: the softmax's normaliser)
                                      # to the training loss (1e-4 in PaLM; logged as train/z_loss; 0 = off)
  train.seed = 0                      # parameter init, dropout and data order
  train.eval_every = 200              # steps between evaluations (and at the last step)
  train.eval_batches = 20             # validation batches per evaluation (fixed, the same every time)
  train.checkpoint_every = 500        # steps between checkpoints (and at the last step)
  train.keep_checkpoints = 3          # checkpoints kept on disk (steps a fine-tuning run is built on are kept too)
  train.async_checkpoints = False     # write checkpoints in the background while training goes on
  train.restore_step = -1             # resume from this checkpoint (-1 = the latest readable one); later ones are
                                      # moved aside to checkpoints/replaced-<step>, never deleted
  train.branch_from = ""              # a new run starts from this run's checkpoint (workdir): parameters, optimizer
                                      # state, step and data position; only the schedule keys may differ (a cooldown)
  train.branch_step = -1              # branch_from's step to start from (-1 = its latest)
  train.nonfinite = "stop"            # a NaN/inf loss or gradient: stop (before any save) | skip (the update, counted)
  train.log_every = 10                # steps between metric lines in metrics.jsonl
  train.num_samples = 3               # continuations printed at the end
  train.sample_tokens = 200           # tokens per continuation
  train.sample_temperature = 0.8      # sampling temperature (0 = greedy)
  train.sample_top_k = 0              # top-k filter for samples (0 = off)
  train.sample_prompt = ""            # prompt for the final samples ("" = start of sequence)

  config.mesh = mesh = ml_collections.ConfigDict()
  mesh.data = -1                      # data-parallel axis (-1 = all devices not used by fsdp, expert, tensor)
  mesh.fsdp = 1                       # parameters and optimizer state sharded over this axis (ZeRO-3)
  mesh.expert = 1                     # a mixture of experts' experts split over this axis (expert parallelism; the
                                      # batch is split over it too, as over data); tokens reach them by all-to-all
  mesh.tensor = 1                     # Megatron-style tensor parallel over heads and MLP width
  mesh.slices = 1                     # TPU slices (or GPU hosts) over the data-center network: the data axis spans
                                      # them, fsdp, expert, tensor stay in one (a hybrid mesh); data must divide by it
  # Logical parameter/activation axis -> mesh axis (or None = replicated). A dimension that does not
  # divide by its mesh axis size is replicated instead. Activations (model/sharding.py) use batch, length,
  # activation_embed, batch_no_expert (the rows of tokens sent to experts) and the head / mlp / vocab / expert names;
  # parameters use the rest.
  mesh.rules = (
      ("batch", ("data", "fsdp", "expert")),
      ("batch_no_expert", ("data", "fsdp")),
      ("expert", "expert"),
      ("activation_embed", None),
      ("vocab", "tensor"),
      ("embed", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("kv_heads", "tensor"),
      ("kv", None),
      ("length", None),
  )
  config.lock()  # a typo in a derived config or on the command line is an error, not a new key
  return config


def with_defaults(saved: dict) -> ml_collections.ConfigDict:
  """A run's saved config.json with the defaults above for the keys added since it was written (locked)."""
  def merged(defaults: dict, values: dict) -> dict:
    out = dict(defaults)
    for key, value in values.items():
      both = isinstance(value, dict) and isinstance(defaults.get(key), dict)
      out[key] = merged(defaults[key], value) if both else value
    return out
  config = ml_collections.ConfigDict(merged(get_config().to_dict(), saved))
  config.lock()
  return config
