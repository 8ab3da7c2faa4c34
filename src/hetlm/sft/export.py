"""Merging a LoRA adapter into its base model: one plain ``transformers`` checkpoint.

A LoRA adapter is small and loads with plain ``peft`` on top of its base model; a merged model
needs neither ``peft`` nor the base at serving time, and runs at the base model's speed (the
low-rank product is folded into each weight: W' = W + scale * B @ A). The merged folder has the
weights as safetensors, the tokenizer (the adapter's if it carries one, since training may have
changed it, else the base's), the prompt template record, and the training template as the
tokenizer's chat template (:mod:`hetlm.sft.vllm_export`), so ``hetlm chat``/``serve``,
``AutoModelForCausalLM`` and vLLM load it directly and format chats as in training; the folder is
checked for what vLLM needs before it is put in place.

The folder is written under a temporary name and renamed into place, so a failed export never
leaves a half-written model where a good one is expected.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from hetlm.chat.templates import TEMPLATE_FILE, ChatTemplate, load_saved_template, resolve_template
from hetlm.data.tokenizer import TOKENIZER_FILES
from hetlm.errors import HetlmError

EXPORT_RECORD = "hetlm_export.json"


def has_tokenizer(directory: str | Path) -> bool:
    """Whether a folder holds tokenizer files (transformers 5 silently loads an *empty*
    tokenizer from a folder without them, so this is checked, never assumed)."""
    return any((Path(directory) / name).is_file() for name in TOKENIZER_FILES)


def check_model_dir(path: str | Path, what: str = "model") -> Path:
    """A folder with a ``config.json``, or a HetlmError saying what is missing."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise HetlmError(
            f"{what} folder {path} has no config.json (expected a folder written "
            "by save_pretrained)"
        )
    return path


def check_adapter_dir(path: str | Path) -> Path:
    """A folder with a peft ``adapter_config.json``."""
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise HetlmError(
            f"adapter folder {path} has no adapter_config.json (expected a folder "
            "written by a peft model's save_pretrained)"
        )
    return path


def tokenizer_dir(model_dir: Path, adapter_dir: Path | None) -> Path:
    """Where the tokenizer comes from: the adapter's folder first, then the model's."""
    for candidate in (adapter_dir, model_dir):
        if candidate is not None and has_tokenizer(candidate):
            return candidate
    where = f"{adapter_dir} or {model_dir}" if adapter_dir else str(model_dir)
    raise HetlmError(
        f"no tokenizer files in {where}: save the tokenizer beside the model "
        "(tokenizer.save_pretrained)"
    )


def import_peft():
    """``peft``, or a HetlmError naming the extra that installs it."""
    try:
        import peft
    except ImportError as exc:
        raise HetlmError(
            "LoRA adapters need peft: pip install 'hetlm[chat]' (or pip install peft)"
        ) from exc
    import warnings

    # peft still calls transformers 5's deprecated is_gradient_checkpointing: not the user's to fix
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
    return peft


def write_folder(target: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` fills a temporary sibling folder, which then replaces ``target``: a crash
    never leaves a half-written ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def merge_adapter(
    base_dir: str | Path,
    adapter_dir: str | Path,
    output_dir: str | Path,
    *,
    overwrite: bool = False,
) -> Path:
    """Merge the LoRA adapter into the base model and save the result to ``output_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    peft = import_peft()
    base = check_model_dir(base_dir, "base model")
    adapter = check_adapter_dir(adapter_dir)
    output = Path(output_dir)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise HetlmError(f"{output} exists and is not empty: choose another --output or remove it")
    tokenizer_source = tokenizer_dir(base, adapter)

    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    model = peft.PeftModel.from_pretrained(model, adapter)
    merged = model.merge_and_unload(safe_merge=True)  # safe_merge: refuse NaN weights
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    chat_template_from = set_chat_template(tokenizer, adapter, base)

    def write(tmp: Path) -> None:
        from hetlm.sft.vllm_export import vllm_missing

        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if not has_tokenizer(tmp):
            raise HetlmError(
                f"saving the tokenizer from {tokenizer_source} wrote no tokenizer files"
            )
        for source in (adapter, base):
            if (source / TEMPLATE_FILE).is_file():
                shutil.copy2(source / TEMPLATE_FILE, tmp / TEMPLATE_FILE)
                break
        record = {
            "base_model": str(base),
            "adapter": str(adapter),
            "tokenizer_from": str(tokenizer_source),
            "peft_version": peft.__version__,
            "chat_template_from": chat_template_from,
        }
        (tmp / EXPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        missing = vllm_missing(tmp)
        if missing:
            raise HetlmError(
                f"the merged folder would lack {', '.join(missing)}, which vLLM "
                f"needs; nothing was written to {output}"
            )

    write_folder(output, write)
    return output


def set_chat_template(tokenizer: object, *folders: Path) -> str:
    """Make the tokenizer's chat template the one the model was trained with (recorded in the
    first of ``folders`` that has a record; else hetlm's ``auto`` choice, as ``hetlm serve``
    makes it): a text template is written as Jinja. Returns where the template came from."""
    from hetlm.chat.prompt import adds_bos
    from hetlm.sft.vllm_export import chat_template_jinja

    template, where = None, "auto"
    for folder in folders:
        template = load_saved_template(folder, tokenizer)
        if template is not None:
            where = str(folder / TEMPLATE_FILE)
            break
    template = template or resolve_template("auto", tokenizer)
    if isinstance(template, ChatTemplate):
        return f"the tokenizer's own chat_template ({where})"
    tokenizer.chat_template = chat_template_jinja(template, bos=adds_bos(tokenizer))
    return f"text template {template.name!r} ({where}) as Jinja"
