"""Text sources: resolve path specs to files, read documents, split train / validation.

Offers `DataError`, `resolve_paths`, `probe` (what can be checked of a source from the start of its files, before a
run writes anything), `read_documents`, `read_records` (JSONL records with required fields), `split_documents`;
files are UTF-8, other bytes handled as `ENCODING_ERRORS` says. A part "hf:..." of a path spec is a Hugging Face
dataset read locally with the optional `datasets` package.
"""

import codecs
import glob
import json
import os
import sysconfig
from typing import Sequence

DIR_EXTENSIONS = (".txt", ".md", ".py", ".jsonl", ".json")
JSON_EXTENSIONS = (".jsonl", ".json")
BUILTIN_STDLIB = "builtin:python_stdlib"
HUGGING_FACE = "hf:"  # a Hugging Face dataset: hf:DIR (save_to_disk) or hf:FILES (parquet, JSON lines, CSV), @split
ENCODING_ERRORS = ("strict", "replace", "ignore")  # config.data.encoding_errors
PROBE_BYTES = 1 << 16  # what `probe` reads of each file
# Folders of the standard library left out of the built-in corpus (tests, third-party, legacy tools).
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3"}


class DataError(ValueError):
  """A problem with user data; message is one line naming the file (and line) and what was expected."""


def _stdlib_files() -> list[str]:
  """The .py files of the Python standard library, sorted, without tests and third-party packages."""
  root = sysconfig.get_paths()["stdlib"]
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]
    files.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
  return sorted(files)


def _dir_files(directory: str) -> list[str]:
  """Files under `directory` (recursively) with a known text extension, sorted."""
  files = []
  for dirpath, _, filenames in os.walk(directory):
    files.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(DIR_EXTENSIONS))
  return sorted(files)


def resolve_paths(path_spec: str) -> list[str]:
  """Files named by a file, glob, directory, comma-separated list of those, or "builtin:python_stdlib"."""
  files = []
  for part in (p.strip() for p in path_spec.split(",")):
    if not part:
      continue
    if part == BUILTIN_STDLIB:
      found = _stdlib_files()
    elif os.path.isdir(part):
      found = _dir_files(part)
    elif os.path.isfile(part):
      found = [part]
    else:
      found = sorted(f for f in glob.glob(part, recursive=True) if os.path.isfile(f))
    if not found:
      raise DataError(f"data path '{part}': no files match")
    files.extend(found)
  if not files:
    raise DataError(f"data path '{path_spec}': no files match")
  return files


def _check_encoding_errors(encoding_errors: str) -> None:
  """DataError naming data.encoding_errors unless it is one of ENCODING_ERRORS."""
  if encoding_errors not in ENCODING_ERRORS:
    raise DataError(f"data.encoding_errors {encoding_errors!r}: expected one of {', '.join(ENCODING_ERRORS)}")


def _open_text(path: str, encoding_errors: str):
  """`path` open for reading as UTF-8 text (universal newlines), other bytes handled per `encoding_errors`."""
  _check_encoding_errors(encoding_errors)
  try:
    return open(path, encoding="utf-8", errors=encoding_errors)
  except OSError as e:
    raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def _not_utf8(path: str) -> DataError:
  """The DataError naming the first byte of `path` that is not UTF-8 (a text stream knows no byte offsets)."""
  with open(path, "rb") as f:
    raw = f.read()
  try:
    raw.decode("utf-8")
  except UnicodeDecodeError as e:
    line = raw.count(b"\n", 0, e.start) + 1
    return DataError(f"{path}: byte {e.start} (line {line}) is not UTF-8 (0x{raw[e.start]:02x}); fix the file "
                     f"or set data.encoding_errors to replace or ignore")
  return DataError(f"{path}: not UTF-8; fix the file or set data.encoding_errors to replace or ignore")


def _read_text(path: str, encoding_errors: str) -> str:
  """The text of `path`; strict: a DataError naming the first byte that is not UTF-8."""
  with _open_text(path, encoding_errors) as f:
    try:
      return f.read()
    except UnicodeDecodeError:
      raise _not_utf8(path) from None


def _json_objects(path: str, encoding_errors: str):
  """Yield ("file:line", object) for each non-blank line of a JSONL file; DataError on a bad line."""
  with _open_text(path, encoding_errors) as f:
    try:
      for lineno, line in enumerate(f, start=1):
        if not line.strip():
          continue
        where = f"{path}:{lineno}"
        try:
          obj = json.loads(line)
        except json.JSONDecodeError as e:
          raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
          raise DataError(f"{where}: invalid JSON (nested too deeply)") from None
        except ValueError as e:  # an integer of more than 4300 digits
          raise DataError(f"{where}: invalid JSON ({str(e).split(':')[0]})") from None
        if not isinstance(obj, dict):
          raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        yield where, obj
    except UnicodeDecodeError:
      raise _not_utf8(path) from None


def _check_field(where: str, obj: dict, field: str) -> None:
  """DataError naming the line and the fields it has when `obj` lacks `field`."""
  if field not in obj:
    fields = ", ".join(k if k.isprintable() else repr(k) for k in obj) or "none"  # a key may hold a newline
    raise DataError(f"{where}: no field '{field}' (fields: {fields})")


def _read_json_lines(path: str, text_field: str, encoding_errors: str) -> list[str]:
  """Documents from a file with one JSON object per non-blank line, taking `text_field`."""
  docs = []
  for where, obj in _json_objects(path, encoding_errors):
    _check_field(where, obj, text_field)
    if not isinstance(obj[text_field], str):
      raise DataError(f"{where}: field '{text_field}' should be a string, got {type(obj[text_field]).__name__}")
    docs.append(obj[text_field])
  return docs


def _hugging_face_rows(part: str):
  """("where", row) of a Hugging Face dataset: "hf:DIR[@split]" saved with save_to_disk, or "hf:FILES[@split]"
  (parquet, JSON lines or CSV files, a glob) read with the datasets library, locally."""
  try:
    import datasets  # an optional dependency: only this source needs it
  except ImportError:
    raise DataError(f"data path '{part}': reading Hugging Face datasets needs the datasets package "
                    "(pip install datasets)") from None
  path, _, split = part[len(HUGGING_FACE):].partition("@")
  try:
    if os.path.isdir(path):
      dataset = datasets.load_from_disk(path)
    else:
      files = resolve_paths(path)
      kinds = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
      kind = kinds.get(os.path.splitext(files[0])[1])
      if kind is None:
        raise DataError(f"data path '{part}': expected a dataset directory or {', '.join(kinds)} files")
      dataset = datasets.load_dataset(kind, data_files=files, split="train")
  except (OSError, ValueError, datasets.exceptions.DatasetGenerationError) as e:
    if isinstance(e, DataError):
      raise
    raise DataError(f"data path '{part}': not a readable dataset ({str(e).splitlines()[0][:200]})") from None
  if isinstance(dataset, datasets.DatasetDict):
    if (split or "train") not in dataset:
      raise DataError(f"data path '{part}': no split '{split or 'train'}' (splits: {', '.join(dataset)})")
    dataset = dataset[split or "train"]
  for i, row in enumerate(dataset):
    yield f"{part}[{i}]", row


def _documents(path: str, text_field: str, encoding_errors: str) -> list[str]:
  """The documents of one file (a text file is one, a JSONL line is one) or Hugging Face dataset."""
  if path.startswith(HUGGING_FACE):
    docs = []
    for where, row in _hugging_face_rows(path):
      _check_field(where, row, text_field)
      if not isinstance(row[text_field], str):
        raise DataError(f"{where}: field '{text_field}' should be a string, got {type(row[text_field]).__name__}")
      docs.append(row[text_field])
    return docs
  if path.endswith(JSON_EXTENSIONS):
    return _read_json_lines(path, text_field, encoding_errors)
  return [_read_text(path, encoding_errors)]


def _paths(path_spec: str) -> list[str]:
  """resolve_paths, with each Hugging Face dataset part ("hf:...") kept as it is."""
  paths = []
  for part in (p.strip() for p in path_spec.split(",") if p.strip()):
    paths.extend([part] if part.startswith(HUGGING_FACE) else resolve_paths(part))
  if not paths:
    raise DataError(f"data path '{path_spec}': no files match")
  return paths


def probe(path_spec: str, encoding_errors: str = "strict", max_bytes: int = 0, records: bool = False) -> None:
  """The DataError that reading `path_spec` would raise, as far as the first PROBE_BYTES of each file tell: a part
  that matches no file, a file that cannot be opened, bytes that are not UTF-8 (under `encoding_errors`), a corpus
  of blank files. Cheap enough to run before a run writes anything; errors further into a file come later. With
  `max_bytes`, only the files that reading surely opens are probed (those before max_bytes of files); `records`:
  only the JSON files, as read_records reads them."""
  _check_encoding_errors(encoding_errors)
  files = _paths(path_spec)
  if records:
    files = [f for f in files if f.endswith(JSON_EXTENSIONS) or f.startswith(HUGGING_FACE)]
    if not files:
      raise DataError(f"data path '{path_spec}': no {' or '.join(JSON_EXTENSIONS)} files")
  blank, seen = True, 0
  for path in files:
    if path.startswith(HUGGING_FACE) or (max_bytes > 0 and seen >= max_bytes):  # hf: read by the datasets package
      blank = False
      break
    try:
      with open(path, "rb") as f:
        head = f.read(PROBE_BYTES + 1)
    except OSError as e:
      raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    whole = len(head) <= PROBE_BYTES
    try:  # an incremental decoder: a character cut at the end of the chunk is not an error
      text = codecs.getincrementaldecoder("utf-8")(errors=encoding_errors).decode(head[:PROBE_BYTES], final=whole)
    except UnicodeDecodeError:
      raise _not_utf8(path) from None
    blank, seen = blank and whole and not text.strip(), seen + os.path.getsize(path)
  if blank:
    raise DataError(f"data path '{path_spec}': the corpus is empty ({len(files)} files, no text)")


def read_documents(path_spec: str, text_field: str = "text", max_bytes: int = 0,
                   encoding_errors: str = "strict") -> list[str]:
  """Documents from the files of `path_spec`: a text file is one document, a JSONL line or dataset row is one."""
  _check_encoding_errors(encoding_errors)
  files = _paths(path_spec)
  docs, total = [], 0
  for path in files:
    file_docs = _documents(path, text_field, encoding_errors)
    for doc in file_docs:
      if max_bytes > 0 and total >= max_bytes:
        break
      if doc.strip():
        docs.append(doc)
        total += len(doc.encode("utf-8"))
    if max_bytes > 0 and total >= max_bytes:
      break
  if not docs:
    raise DataError(f"data path '{path_spec}': the corpus is empty ({len(files)} files, no text)")
  return docs


def read_records(path_spec: str, fields: Sequence[str], max_records: int = 0,
                 encoding_errors: str = "strict", nonempty: Sequence[str] = ()) -> list[dict]:
  """JSON objects (values as parsed) from the .jsonl/.json files of `path_spec`, each holding `fields`, and a
  string with more than white space in each of `nonempty`."""
  # Other files a directory holds (SOURCE.md, .tsv) are skipped; max_records > 0 stops after that many.
  _check_encoding_errors(encoding_errors)
  files = [f for f in _paths(path_spec) if f.endswith(JSON_EXTENSIONS) or f.startswith(HUGGING_FACE)]
  if not files:
    raise DataError(f"data path '{path_spec}': no {' or '.join(JSON_EXTENSIONS)} files")
  records = []
  for path in files:
    rows = _hugging_face_rows(path) if path.startswith(HUGGING_FACE) else _json_objects(path, encoding_errors)
    for where, obj in rows:
      for field in fields:
        _check_field(where, obj, field)
      for field in nonempty:
        _check_field(where, obj, field)
        if not isinstance(obj[field], str) or not obj[field].strip():
          raise DataError(f"{where}: field '{field}' should be a non-empty string, got {obj[field]!r:.40}")
      records.append(obj)
      if len(records) == max_records:
        return records
  if not records:
    raise DataError(f"data path '{path_spec}': no records ({len(files)} JSONL files, all blank)")
  return records


def split_documents(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
  """Deterministic (train, val) split: by characters for one document, else every n-th document."""
  if val_fraction <= 0:
    return list(docs), []
  if not 0 < val_fraction < 1:
    raise DataError(f"val_fraction {val_fraction}: expected a number in [0, 1)")
  if len(docs) == 1:
    cut = int(len(docs[0]) * (1 - val_fraction))
    return [docs[0][:cut]], [docs[0][cut:]]
  n = max(2, round(1 / val_fraction))
  train = [d for i, d in enumerate(docs) if i % n != n - 1]
  val = [d for i, d in enumerate(docs) if i % n == n - 1]
  if not val:  # fewer documents than n: the last one still goes to validation
    train, val = list(docs[:-1]), [docs[-1]]
  return train, val
