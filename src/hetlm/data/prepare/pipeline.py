"""The ``hetlm prepare`` pipeline: read, clean, cut into chunks, tokenize, pack, merge.

``prepare`` = run shard 0 of 1 in a work folder, then merge it into the dataset folder. A sharded
run (``--shard i/n``) stops after its shard; ``merge_shards`` combines the n shard folders. The
rules (chunks, shards, resume) are in :mod:`hetlm.data.prepare.shards`; the packing of one chunk is
:func:`hetlm.data.prepare.packing.pack_documents`.

Memory stays flat whatever the corpus size: documents stream through; at most ``4 * workers``
tokenization batches are in flight; one chunk's token ids (``chunk_chars`` characters, ~4 bytes
per token) are held until the chunk is packed; duplicate detection keeps 8 bytes per unique
document (:class:`hetlm.data.prepare.cleaning.HashSet`).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hetlm.data.packed import (
    FORMAT,
    MANIFEST_FILE,
    META_FILE,
    SPLITS,
    load_packed_dataset,
    sha256_file,
    write_json_atomic,
)
from hetlm.data.prepare.cleaning import CleaningOptions, CleaningStats, DocumentCleaner
from hetlm.data.prepare.corpus import (
    CorpusStats,
    as_input_list,
    check_text_files,
    iter_corpus,
    require_documents,
    resolve_inputs,
)
from hetlm.data.prepare.encoding import EncoderSpec, encode_batches
from hetlm.data.prepare.packing import (
    PrepareSummary,
    SplitCounts,
    SplitWriter,
    ValidationReserve,
    check_counts,
    check_output_dir,
    check_pack_options,
    pack_documents,
    split_score,
)
from hetlm.data.prepare.shards import (
    CHUNKS,
    DEFAULT_CHUNK_CHARS,
    SHARD_FILE,
    SHARD_FORMAT,
    ChunkBuffer,
    ChunkPlan,
    chunk_batches,
    chunk_name,
    completed_chunks,
    fingerprint_differences,
    read_shard_file,
    write_manifest,
    write_split_layout,
)
from hetlm.data.prepare.sources import HFSource
from hetlm.errors import HetlmError


@dataclass
class PrepareOptions:
    """Everything that decides the packed output (and what does not: workers, batch_docs)."""

    seq_len: int
    validation_fraction: float
    seed: int
    workers: int
    batch_docs: int
    text_field: str
    normalize: bool
    cleaning: CleaningOptions = field(default_factory=CleaningOptions)
    chunk_chars: int = 4_000_000
    strict: bool = False
    max_chunks: int | None = None


@dataclass
class _Context:
    """What a shard run needs besides the options."""

    files: list[Path]
    hf: HFSource | None
    inputs: list[str]
    tokenizer: Any
    tokenizer_dir: Path
    encoder: EncoderSpec
    special: dict[str, int]


# ---------------------------------------------------------------- entry point


def prepare(
    inputs: Sequence[str | Path],
    tokenizer_dir: str | Path,
    output_dir: Path,
    options: PrepareOptions,
    *,
    overwrite: bool = False,
    shard: tuple[int, int] | None = None,
    hf: HFSource | None = None,
    work_dir: Path | None = None,
) -> PrepareSummary:
    """Prepare a dataset (``shard`` None) or one shard folder (``shard=(i, n)``)."""
    from hetlm.data.tokenizer import boundary_ids, load_tokenizer, special_token_ids

    if options.chunk_chars < 1:
        raise HetlmError(f"chunk_chars must be positive, got {options.chunk_chars}")
    if options.max_chunks is not None and options.max_chunks < 1:
        raise HetlmError(f"max_chunks must be at least 1, got {options.max_chunks}")
    if shard is None:
        check_output_dir(output_dir, overwrite)
    inputs = as_input_list(inputs) if inputs else []
    files = resolve_inputs(inputs) if inputs or hf is None else []
    check_text_files(files)  # input errors before any work
    # BERT-style (hetlm) tokenizers and causal-LM ones (BOS/EOS, LLaMA-style) both pack
    tokenizer = load_tokenizer(tokenizer_dir, required_tokens=())
    special = special_token_ids(tokenizer)
    boundary_ids(special)  # refuses a tokenizer without a separator now
    context = _Context(
        files,
        hf,
        [str(i) for i in inputs],
        tokenizer,
        Path(tokenizer_dir),
        EncoderSpec.for_tokenizer(tokenizer, tokenizer_dir),
        special,
    )
    if shard is not None:
        return _prepare_shard(context, output_dir, options, shard, overwrite)

    work = work_dir or output_dir.parent / f".{output_dir.name}.partial"
    work.parent.mkdir(parents=True, exist_ok=True)
    notes = []
    state = read_shard_file(work) if work.is_dir() else None
    if state is not None and state["fingerprint"] != fingerprint(context, options):
        differs = fingerprint_differences(state["fingerprint"], fingerprint(context, options))
        notes.append(
            f"Discarded an unfinished earlier run in {work} made with other settings "
            f"({', '.join(differs)})."
        )
        shutil.rmtree(work)
    elif work.exists() and state is None and any(work.iterdir()):
        raise HetlmError(
            f"work folder {work} exists and is not a hetlm shard folder: delete it "
            "or pass another --work-dir"
        )
    try:
        result = run_shard(context, work, options, (0, 1))
        if not result.complete:
            result.notes = notes + result.notes
            return result
        summary = merge_shards([work], output_dir, overwrite=overwrite, move=True)
    except HetlmError:
        shutil.rmtree(work, ignore_errors=True)  # bad input or options: nothing to resume
        raise
    shutil.rmtree(work, ignore_errors=True)
    summary.chunks_this_run, summary.chunks_resumed = result.chunks_this_run, result.chunks_resumed
    summary.notes = notes + summary.notes
    return summary


def prepare_dataset(
    inputs: Sequence[str | Path],
    tokenizer_dir: str | Path,
    output_dir: str | Path,
    *,
    seq_len: int = 128,
    validation_fraction: float = 0.02,
    text_field: str = "text",
    normalize: bool = True,
    workers: int | None = None,
    seed: int = 0,
    batch_docs: int = 256,
    overwrite: bool = False,
    cleaning: CleaningOptions | None = None,
    chunk_chars: int | None = None,
    shard: tuple[int, int] | None = None,
    hf: Any = None,
    strict: bool = False,
    work_dir: str | Path | None = None,
    max_chunks: int | None = None,
) -> PrepareSummary:
    """Tokenize the corpus and save packed train/validation sequences to ``output_dir``.

    The result appears under ``output_dir`` only when complete: it is built in a work folder
    beside it (``.<name>.partial``, or ``work_dir``) and renamed into place. A run that is killed
    leaves the work folder; running the same command again resumes from its finished chunks.
    ``workers`` defaults to the CPUs this process may use. ``cleaning`` defaults to
    :class:`CleaningOptions` () (duplicates, short documents, control characters);
    ``hf`` is a :class:`hetlm.data.prepare.sources.HFSource` read after the files. With
    ``shard=(i, n)`` ``output_dir`` receives shard i of n, to be combined by
    :func:`merge_shards`. ``max_chunks`` stops after that many newly
    tokenized chunks (the summary then says ``complete=False``; run again to continue).
    """
    workers = check_pack_options(seq_len, validation_fraction, workers, batch_docs)
    options = PrepareOptions(
        seq_len=seq_len,
        validation_fraction=validation_fraction,
        seed=seed,
        workers=workers,
        batch_docs=batch_docs,
        text_field=text_field,
        normalize=normalize,
        cleaning=cleaning if cleaning is not None else CleaningOptions(),
        chunk_chars=chunk_chars or DEFAULT_CHUNK_CHARS,
        strict=strict,
        max_chunks=max_chunks,
    )
    return prepare(
        inputs,
        tokenizer_dir,
        Path(output_dir),
        options,
        overwrite=overwrite,
        shard=shard,
        hf=hf,
        work_dir=Path(work_dir) if work_dir else None,
    )


def _prepare_shard(
    context: _Context,
    folder: Path,
    options: PrepareOptions,
    shard: tuple[int, int],
    overwrite: bool,
) -> PrepareSummary:
    state = read_shard_file(folder) if folder.is_dir() else None
    if state is None and folder.exists() and any(folder.iterdir()):
        raise HetlmError(
            f"shard output {folder} exists and is not a hetlm shard folder: choose another --output"
        )
    if state is not None:
        current = fingerprint(context, options)
        if state["fingerprint"] != current or state["shard"] != list(shard):
            if not overwrite:
                differs = fingerprint_differences(state["fingerprint"], current)
                if state["shard"] != list(shard):
                    differs.append("shard")
                raise HetlmError(
                    f"shard folder {folder} holds a run with other settings "
                    f"({', '.join(differs)}): use the same options to resume, or "
                    "pass --overwrite to start it again"
                )
            shutil.rmtree(folder)
    return run_shard(context, folder, options, shard)


# ---------------------------------------------------------------- fingerprint and metadata


def fingerprint(context: _Context, options: PrepareOptions) -> dict[str, Any]:
    """What decides the output. Files are named by base name and size, so a shard run on
    another node with its own copy of the corpus (another path) still merges."""
    from hetlm.data.tokenizer import vocab_hash

    return {
        "format": FORMAT,
        "files": [[f.name, f.stat().st_size] for f in context.files],
        "hf_dataset": context.hf.as_dict() if context.hf else None,
        "text_field": options.text_field,
        "normalize": options.normalize,
        "cleaning": options.cleaning.as_dict(),
        "seq_len": options.seq_len,
        "validation_fraction": options.validation_fraction,
        "seed": options.seed,
        "chunk_chars": options.chunk_chars,
        "tokenizer_vocab_hash": vocab_hash(context.tokenizer),
        "encoding": context.encoder.rule,
    }


def _tokenizer_meta(context: _Context) -> dict[str, Any]:
    """The tokenizer part of ``hetlm_dataset.json``, computed once per shard run."""
    from hetlm.data.tokenizer import continuation_token_ids, tokenizer_kind, vocab_hash

    continuation = continuation_token_ids(context.tokenizer)
    tokenizer_dir = context.tokenizer_dir
    return {
        "vocab_size": len(context.tokenizer),
        "special_token_ids": context.special,
        "tokenizer_dir": str(tokenizer_dir.resolve())
        if tokenizer_dir.exists()
        else str(tokenizer_dir),
        "tokenizer_vocab_hash": vocab_hash(context.tokenizer),
        "tokenizer_type": tokenizer_kind(context.tokenizer),
        # Whole-word masking: a word is a token whose id is not listed here followed by its
        # listed (continuation, "##...") tokens. None: the tokenizer marks no words.
        "whole_word_masking": {
            "available": continuation is not None,
            "continuation_prefix": "##" if continuation is not None else None,
        },
        "continuation_token_ids": continuation,
    }


# ---------------------------------------------------------------- running a shard


def run_shard(
    context: _Context, folder: Path, options: PrepareOptions, shard: tuple[int, int]
) -> PrepareSummary:
    """Tokenize and pack this shard's chunks into ``folder`` (resuming finished ones)."""
    index, count = shard
    chunks_dir = folder / CHUNKS
    chunks_dir.mkdir(parents=True, exist_ok=True)
    state = {
        "format": SHARD_FORMAT,
        "fingerprint": fingerprint(context, options),
        "shard": [index, count],
        "complete": False,
        "inputs": context.inputs,
        "options": {
            "text_field": options.text_field,
            "normalize": options.normalize,
            "validation_fraction": options.validation_fraction,
            "seed": options.seed,
            "seq_len": options.seq_len,
            "chunk_chars": options.chunk_chars,
        },
        "hf_dataset": context.hf.as_dict() if context.hf else None,
        "tokenizer": _tokenizer_meta(context),
    }
    write_json_atomic(folder / SHARD_FILE, state)
    done = completed_chunks(chunks_dir)
    resumed = sum(1 for c in done if c % count == index)

    stats, cleaner = CorpusStats(), DocumentCleaner(options.cleaning, CleaningStats())
    documents = iter_corpus(
        context.files,
        context.hf,
        text_field=options.text_field,
        normalize=options.normalize,
        stats=stats,
        strict=options.strict,
    )
    plan = ChunkPlan(options.chunk_chars)
    batches = chunk_batches(
        cleaner.filter_indexed(documents),
        plan,
        lambda c: c % count == index and c not in done,
        options.batch_docs,
    )
    encoded = encode_batches(batches, context.encoder, workers=options.workers)
    new = 0
    stopped = False
    # Packing, writing, fsync and hashing a chunk run in a thread (numpy, Arrow, file I/O and
    # hashlib release the GIL) while the main thread keeps the tokenizer workers fed; at most
    # one chunk is being finished while the next one is collected.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="hetlm-chunk") as finisher:
        pending = None
        for buffer in _chunk_buffers(encoded):
            if pending is not None:
                marker = pending.result()
                done[marker["chunk"]] = marker
            pending = finisher.submit(_finish_chunk, buffer, chunks_dir, options, context.special)
            new += 1
            if options.max_chunks is not None and new >= options.max_chunks:
                stopped = True
                break
        encoded.close()  # stops the worker pool when stopped early
        if pending is not None:
            marker = pending.result()
            done[marker["chunk"]] = marker
    mine = {c: m for c, m in done.items() if c % count == index}
    summary = _shard_summary(folder, options, context, mine, stats, cleaner, shard)
    summary.chunks_this_run, summary.chunks_resumed = new, resumed
    if stopped:
        summary.complete = False
        return summary
    require_documents(
        stats, context.inputs + ([context.hf.label()] if context.hf else []), options.text_field
    )
    if cleaner.stats.kept == 0:
        raise HetlmError(
            f"cleaning removed every document ({cleaner.stats.summary(cleaner.options)})"
            "; lower --min-doc-chars or switch cleaning steps off"
        )
    state.update(
        complete=True,
        total_chunks=plan.total,
        chunks=sorted(mine),
        corpus={**stats.as_dict(), "summary": stats.summary()},
        cleaning={
            "options": options.cleaning.as_dict(),
            **cleaner.stats.as_dict(),
            "summary": cleaner.stats.summary(options.cleaning),
        },
        finished=_now(),
    )
    write_json_atomic(folder / SHARD_FILE, state)
    summary.chunks = plan.total
    return summary


def _chunk_buffers(encoded: Iterator[tuple[Any, np.ndarray, np.ndarray]]) -> Iterator[ChunkBuffer]:
    """Group the encoded batches (tagged (chunk, indices), in order) into whole chunks."""
    buffer: ChunkBuffer | None = None
    for (chunk, indices), flat, lengths in encoded:
        if buffer is not None and buffer.chunk != chunk:
            yield buffer
            buffer = None
        if buffer is None:
            buffer = ChunkBuffer(chunk)
        buffer.add(indices, flat, lengths)
    if buffer is not None:
        yield buffer


def _finish_chunk(
    buffer: ChunkBuffer, chunks_dir: Path, options: PrepareOptions, special: dict[str, int]
) -> dict[str, Any]:
    """Split, pack and write one chunk; its marker, renamed into place last, is the commit."""
    from hetlm.data.tokenizer import boundary_ids

    indices, documents = buffer.documents()
    keep = [k for k, ids in enumerate(documents) if len(ids)]
    without_tokens = len(documents) - len(keep)
    scores = {k: split_score(int(indices[k]), options.seed) for k in keep}
    validation = {k for k in keep if scores[k] < options.validation_fraction}
    chunk_tokens = options.seq_len - 2
    val_stream = sum(len(documents[k]) + 1 for k in validation) - (1 if validation else 0)
    if val_stream < chunk_tokens:  # no full validation row: borrow the lowest-scored documents
        reserve = ValidationReserve(chunk_tokens)
        for k in keep:
            if k not in validation:
                reserve.offer(scores[k], k, len(documents[k]))
        validation |= reserve.pick(val_stream, len(validation))
    name = chunk_name(buffer.chunk)
    marker: dict[str, Any] = {
        "chunk": buffer.chunk,
        "documents_without_tokens": without_tokens,
        "counts": {},
        "files": {},
    }
    for split in SPLITS:
        chosen = [documents[k] for k in keep if (k in validation) == (split == "validation")]
        rows, counts = pack_documents(chosen, options.seq_len, *boundary_ids(special))
        marker["counts"][split] = asdict(counts)
        path = chunks_dir / f"{name}-{split}.arrow"
        tmp = chunks_dir / f".{name}-{split}.arrow.tmp"
        writer = SplitWriter(tmp, options.seq_len)
        for start in range(0, len(rows), 4096):
            writer.write(rows[start : start + 4096])
        writer.close()
        _fsync(tmp)
        os.replace(tmp, path)
        marker["files"][split] = {
            "name": path.name,
            "rows": int(len(rows)),
            "bytes": path.stat().st_size,
            "sha256": sha256_file(path),
        }
    write_json_atomic(chunks_dir / f"{name}.json", marker)
    return marker


def _fsync(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _sum_counts(markers: dict[int, dict[str, Any]]) -> tuple[dict[str, SplitCounts], int]:
    totals = {split: SplitCounts() for split in SPLITS}
    without = 0
    for marker in markers.values():
        without += marker["documents_without_tokens"]
        for split in SPLITS:
            for key, value in marker["counts"][split].items():
                setattr(totals[split], key, getattr(totals[split], key) + value)
    return totals, without


def _shard_summary(
    folder: Path,
    options: PrepareOptions,
    context: _Context,
    markers: dict[int, dict[str, Any]],
    stats: CorpusStats,
    cleaner: DocumentCleaner,
    shard: tuple[int, int],
) -> PrepareSummary:
    totals, without = _sum_counts(markers)
    return PrepareSummary(
        folder,
        options.seq_len,
        len(context.tokenizer),
        totals["train"],
        totals["validation"],
        stats,
        without,
        cleaner.stats,
        options.cleaning,
        shard=shard,
    )


# ---------------------------------------------------------------- merging


def merge_shards(
    shard_dirs: Sequence[str | Path],
    output_dir: str | Path,
    *,
    overwrite: bool = False,
    move: bool = False,
) -> PrepareSummary:
    """Combine the folders of shards 0..n-1 into one dataset, without rewriting token data.

    Chunk files are hard-linked (or moved with ``move``; copied only across filesystems) into
    the ``save_to_disk`` layout. The result equals a single run over the same corpus.
    """
    output_dir = Path(output_dir)
    check_output_dir(output_dir, overwrite)
    states = _read_complete_shards([Path(d) for d in shard_dirs])
    first_dir, first = states[0]
    count = first["shard"][1]
    total = first["total_chunks"]
    markers: dict[int, tuple[Path, dict[str, Any]]] = {}
    for folder, state in states:
        done = completed_chunks(folder / CHUNKS)
        for chunk in state["chunks"]:
            if chunk not in done:
                raise HetlmError(
                    f"shard {folder} lacks chunk {chunk} (its files are missing or "
                    "damaged): run that shard again"
                )
            markers[chunk] = (folder / CHUNKS, done[chunk])
    missing = [c for c in range(total) if c not in markers]
    if missing:
        raise HetlmError(f"the shards lack chunks {missing[:10]}: run every shard of {count}")
    totals, without = _sum_counts({c: m for c, (_, m) in markers.items()})
    seq_len = first["fingerprint"]["seq_len"]
    check_counts(totals, seq_len)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.merging-", dir=output_dir.parent))
    try:
        built = staging / "dataset"
        built.mkdir()
        known: dict[str, tuple[int, str]] = {}
        how: dict[str, int] = {}
        for split in SPLITS:
            entries = [
                (folder / marker["files"][split]["name"], marker["files"][split])
                for folder, marker in (markers[c] for c in range(total))
                if marker["files"][split]["rows"]
            ]
            for k, (_, entry) in enumerate(entries):
                name = f"{split}/data-{k:05d}-of-{len(entries):05d}.arrow"
                known[name] = (entry["bytes"], entry["sha256"])
            files = [path for path, _ in entries]
            for verb, n in write_split_layout(built / split, files, seq_len, split, move).items():
                how[verb] = how.get(verb, 0) + n
        (built / "dataset_dict.json").write_text(
            json.dumps({"splits": list(SPLITS)}), encoding="utf-8"
        )
        summary = PrepareSummary(
            output_dir,
            seq_len,
            first["tokenizer"]["vocab_size"],
            totals["train"],
            totals["validation"],
            _corpus_stats(first["corpus"]),
            without,
            _cleaning_stats(first["cleaning"]),
            CleaningOptions(**first["cleaning"]["options"]),
            chunks=total,
            chunks_this_run=None,
            shard=None,
        )
        meta = _metadata(summary, first, count)
        (built / META_FILE).write_text(
            json.dumps(meta, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
        )
        write_manifest(built, known)
        load_packed_dataset(built)  # the merged folder must load before it is put in place
        if output_dir.exists():
            output_dir.rename(staging / "replaced")  # same parent folder: an atomic rename
        built.rename(output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    verbs = ", ".join(f"{n} {verb}" for verb, n in sorted(how.items()))
    if count > 1 or not move:
        summary.notes.append(
            f"Merged {count} shard(s) from {first_dir.parent} ({verbs} Arrow "
            "file(s), no token data rewritten)."
        )
    return summary


def _read_complete_shards(folders: list[Path]) -> list[tuple[Path, dict[str, Any]]]:
    if not folders:
        raise HetlmError("no shard folders given to merge")
    states = []
    for folder in folders:
        state = read_shard_file(folder) if folder.is_dir() else None
        if state is None:
            raise HetlmError(
                f"{folder} is not a shard folder (no {SHARD_FILE}): pass the "
                "--output folders of `hetlm prepare --shard i/n` runs"
            )
        if not state.get("complete"):
            raise HetlmError(
                f"shard {folder} is not finished: run `hetlm prepare ... --shard "
                f"{state['shard'][0]}/{state['shard'][1]}` again to complete it"
            )
        states.append((folder, state))
    first = states[0][1]
    for folder, state in states[1:]:
        differs = fingerprint_differences(first["fingerprint"], state["fingerprint"])
        if differs or state["total_chunks"] != first["total_chunks"]:
            raise HetlmError(
                f"shard {folder} was made with other settings or another corpus "
                f"than {states[0][0]} ({', '.join(differs) or 'chunk count'})"
            )
    count = first["shard"][1]
    indices = sorted(state["shard"][0] for _, state in states)
    if any(state["shard"][1] != count for _, state in states) or indices != list(range(count)):
        got = ", ".join("{}/{}".format(*state["shard"]) for _, state in states)
        raise HetlmError(f"merge needs each of the shards 0..{count - 1} exactly once; got {got}")
    return sorted(states, key=lambda item: item[1]["shard"][0])


def _corpus_stats(data: dict[str, Any]) -> CorpusStats:
    fields = CorpusStats.__dataclass_fields__
    return CorpusStats(**{k: v for k, v in data.items() if k in fields})


def _cleaning_stats(data: dict[str, Any]) -> CleaningStats:
    fields = CleaningStats.__dataclass_fields__
    return CleaningStats(**{k: v for k, v in data.items() if k in fields})


def _metadata(summary: PrepareSummary, state: dict[str, Any], shards: int) -> dict[str, Any]:
    from hetlm import __version__

    splits = {"train": asdict(summary.train), "validation": asdict(summary.validation)}
    options = state["options"]
    return {
        "format": FORMAT,
        "created": _now(),
        "hetlm_version": __version__,
        "seq_len": options["seq_len"],
        **state["tokenizer"],
        "inputs": state["inputs"],
        "hf_dataset": state.get("hf_dataset"),
        "text_field": options["text_field"],
        "normalize": options["normalize"],
        "validation_fraction": options["validation_fraction"],
        "seed": options["seed"],
        "documents": summary.train.documents + summary.validation.documents,
        "tokens": summary.train.tokens + summary.validation.tokens,
        "documents_without_tokens": summary.documents_without_tokens,
        "num_sequences": {name: counts["sequences"] for name, counts in splits.items()},
        "splits": splits,
        "chunk_chars": options["chunk_chars"],
        "chunks": summary.chunks,
        "shards": shards,
        "encoding": state["fingerprint"]["encoding"],
        "packing": "per chunk: documents joined with [SEP] (EOS for a causal-LM tokenizer), "
        "[CLS] (BOS) + seq_len-2 tokens + [SEP] (EOS) rows, the partial last row of "
        "each split of each chunk dropped",
        "corpus": state["corpus"],
        "cleaning": state["cleaning"],
        "manifest": MANIFEST_FILE,
    }
