"""Use commands, a deployment's clients: ``classify``, ``embed`` (a resumable index, through
:func:`clip_triton.client.resume.embed_into`), ``search``, ``eval`` and ``eval-retrieval``."""

from __future__ import annotations

import sys
from pathlib import Path

from ..contract import DEFAULT_EMBEDDING_TYPE, EMBEDDING_TYPES, TEXT, VISION
from ..errors import ClipTritonError
from .common import EXIT_INTERRUPTED, Rule, add_command, client_args, finish, int_list, read_text

EMBED_RULES: list[Rule] = [
    ("all_files", lambda a: bool(a.images), "--all-files applies to --images"),
    ("shard_size", lambda a: a.format == "parquet", "--shard-size applies to --format parquet"),
    (
        "embedding_type",
        lambda a: a.format == "parquet",
        "--embedding-type applies to --format parquet (NAME.npy holds float32)",
    ),
]


def _client(args):
    """A ClipClient on --url, ready: nothing answering fails after --connect-timeout (one line naming
    the address and `clip-triton serve`); a server that answers but is loading is waited for up to
    --ready-timeout, with a countdown on a terminal. Called only once every input has been checked."""
    from clip_triton.client import ClipClient  # noqa: PLC0415

    urls = [u.strip() for u in args.url.split(",") if u.strip()]
    client = ClipClient(
        urls if len(urls) > 1 else urls[0],
        timeout=args.timeout,
        concurrency=args.concurrency,
        batch_size=args.batch_size,
        progress=args.progress,
        retry_seconds=args.retry_seconds,
        model=args.served_model,
    )
    terminal, said = sys.stderr.isatty(), set()

    def on_wait(state, left: float) -> None:
        if state.state == "unreachable":
            if "unreachable" not in said:
                said.add("unreachable")
                print(f"nothing answers at {args.url} yet; trying for {args.connect_timeout:.0f} s", file=sys.stderr)
        elif terminal:
            said.add("countdown")
            line = f"waiting for clip_image and clip_text at {args.url}: {left:4.0f} s left ({state.reason})"
            print(f"\r{line}", end="", file=sys.stderr, flush=True)
        elif "loading" not in said:
            said.add("loading")
            print(f"waiting up to {left:.0f} s for clip_image and clip_text to be ready at {args.url}", file=sys.stderr)

    try:
        client.wait_until_ready(args.ready_timeout, connect_timeout=args.connect_timeout, on_wait=on_wait)
    except BaseException:
        client.close()
        raise
    finally:
        if "countdown" in said:
            print(file=sys.stderr)  # end the countdown's line
    return client


def _writable(path: str, flag: str) -> Path:
    """An output path the command can write: its folder exists and is writable (checked before the work)."""
    import os  # noqa: PLC0415

    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise ClipTritonError(f"{flag} {path} is a folder", "name a file to write")
    if not folder.is_dir():
        raise ClipTritonError(
            f"{flag} {path}: the folder {folder} does not exist", f"create it first: mkdir -p {folder}"
        )
    if not os.access(folder, os.W_OK):
        raise ClipTritonError(f"{flag} {path}: cannot write in {folder}", "choose a folder you can write to")
    return target


def _local_images(values, flag: str) -> None:
    """Every local image path names a file (http(s) URLs are fetched, and checked, when sent)."""
    for value in values:
        if str(value).lower().startswith(("http://", "https://")):
            continue
        path = Path(value)
        if not path.exists():
            raise ClipTritonError(f"{flag} {value}: no such file", "pass image files or http(s) URLs")
        if path.is_dir():
            raise ClipTritonError(
                f"{flag} {value} is a folder", "pass image files (`clip-triton embed --images` takes a folder)"
            )


def _positive(value: int | None, flag: str) -> None:
    if value is not None and value < 1:
        raise ClipTritonError(f"{flag} {value}: expected a positive number")


def _report_item_errors(errors: dict[int, str], names) -> None:
    for index, reason in errors.items():
        print(f"error: item {index} ({names[index]}): {reason}", file=sys.stderr)


def _classify(args) -> int:
    from clip_triton.client import ItemErrors  # noqa: PLC0415
    from clip_triton.client.zeroshot import templates  # noqa: PLC0415

    _local_images(args.images, "image")
    _positive(args.top, "--top")
    template_list = templates(args.templates) if args.templates else None
    with _client(args) as client:
        try:
            results = client.classify(args.images, args.prompts, template_list, language=args.language)
        except ItemErrors as err:
            _report_item_errors(err.errors, args.images)
            return 1
        facts = client.facts
    if facts.random_weights:
        print("NOTE: the served model has RANDOM weights; scores carry no meaning", file=sys.stderr)
    if facts.scoring == "sigmoid":
        print(
            f"scoring: sigmoid (logit_scale {facts.logit_scale:.4g}, logit_bias {facts.logit_bias:.4g}): "
            "each prompt's probability on its own, they need not sum to 1"
        )
    for image, ranked in zip(args.images, results):
        print(image)
        print(f"  {'rank':<6}{'prompt':<40}{'cosine':>9}{'probability':>13}")
        for place, row in enumerate(ranked[: args.top], start=1):
            print(f"  {place:<6}{row['prompt'][:39]:<40}{row['cosine']:>9.4f}{row['probability']:>13.4f}")
    return 0


def _embed(args) -> int:
    from clip_triton.client.index import image_files, index_paths  # noqa: PLC0415
    from clip_triton.client.resume import embed_into, existing_index  # noqa: PLC0415

    kind = VISION.kind if args.images else TEXT.kind
    skipped: dict[str, str] = {}
    if args.images:
        if not Path(args.images).is_dir():
            raise ClipTritonError(
                f"--images {args.images} is not a folder", "pass a folder of images (searched recursively)"
            )
        files, skipped = image_files(args.images, all_files=args.all_files)
        items = [str(p) for p in files]
        if skipped:
            print(
                f"skipped {len(skipped)} files whose suffix is not an image suffix ({_suffix_counts(skipped)}); "
                "listed in the side-car JSON; --all-files tries every file by content",
                file=sys.stderr,
            )
        if not items:
            raise ClipTritonError(
                f"no images under {args.images}",
                "accepted suffixes: .jpg .jpeg .png .webp .bmp .gif .tif .tiff, or --all-files to try every file",
            )
    else:
        items = [line for line in read_text(args.texts, "--texts").splitlines() if line.strip()]
        if not items:
            raise ClipTritonError(f"--texts {args.texts} has no non-empty line", "one text per line")
    _store_modules(args)
    if args.format == "parquet":
        return _embed_parquet(args, items, kind)
    npy, _ = index_paths(args.out)
    _writable(str(npy), "--out")
    previous = existing_index(args.out, kind, force=args.force)  # checked (and read once) before connecting
    with _client(args) as client:
        run = embed_into(
            client,
            items,
            kind,
            args.out,
            force=args.force,
            skipped=skipped,
            log=lambda line: print(line, file=sys.stderr),
            previous=previous,
        )
    if run.failure is not None:
        print(f"error: {run.failure}", file=sys.stderr)
    elif run.refused and not run.interrupted:
        for item, reason in run.refused.items():
            print(f"error: {item}: {reason}", file=sys.stderr)
    npy, meta = index_paths(args.out)
    index = run.index
    missing = [f"{n} {what}" for n, what in ((len(run.unanswered), "unanswered"), (len(run.refused), "refused")) if n]
    print(
        f"wrote {npy} ({len(index)} x {index.embed_dim} float32) and {meta}"
        + (f"; items without a row: {', '.join(missing)} (listed there)" if missing else "")
    )
    _stores(args, index, npy)
    return _embed_exit(args, run, len(index), len(dict.fromkeys(items)))


def _embed_exit(args, run, rows: int, items: int) -> int:
    if run.interrupted:
        print(
            f"interrupted: {rows} of {items} items written; rerun the same command to embed the rest", file=sys.stderr
        )
        return EXIT_INTERRUPTED
    if run.unanswered or (run.refused and not args.skip_errors):
        return 1
    return 0


def _store_modules(args) -> None:
    """What --format parquet, --ann and --lancedb import, checked before any item is embedded."""
    import importlib.util  # noqa: PLC0415

    needed = [
        (flag, module)
        for flag, module, wanted in (
            ("--format parquet", "pyarrow", args.format == "parquet"),
            ("--ann", "faiss", bool(args.ann)),
            ("--lancedb", "lancedb", bool(args.lancedb)),
        )
        if wanted and importlib.util.find_spec(module) is None
    ]
    if needed:
        raise ClipTritonError(
            f"{', '.join(flag for flag, _ in needed)} needs {', '.join(module for _, module in needed)}",
            "pip install 'clip-triton[store]'",
        )


def _stores(args, index, path) -> None:
    """--ann and --lancedb: after the rows are safe on disk, from what was written."""
    from clip_triton.client.store import write_ann, write_lancedb  # noqa: PLC0415

    if args.ann and len(index):
        file = write_ann(index, path, args.ann)
        print(f"wrote {file} ({index.ann.params['type']} over {len(index)} rows; parameters in {file.name}.json)")
    if args.lancedb and len(index):
        table = write_lancedb(index, args.lancedb)
        print(f"wrote LanceDB table {table!r} in {args.lancedb} ({len(index)} rows)")


def _embed_parquet(args, items: list[str], kind: str) -> int:
    from clip_triton.client.parquet import ShardFacts, embed_parquet, existing_shards  # noqa: PLC0415

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ClipTritonError(f"--out {out} is a file", "--format parquet writes a folder of shards: name a folder")
    _writable(str(out / "part-00000.parquet") if out.is_dir() else str(out), "--out")
    _positive(args.shard_size, "--shard-size")
    existing_shards(out, force=args.force)  # damaged or mixed shards are refused before connecting
    with _client(args) as client:
        existing_shards(out, ShardFacts.of(client.facts, kind, args.embedding_type), force=args.force)
        run = embed_parquet(
            client,
            items,
            kind,
            out,
            shard_size=args.shard_size,
            embedding_type=args.embedding_type,
            force=args.force,
            log=lambda line: print(line, file=sys.stderr),
        )
    if run.failure is not None:
        print(f"error: {run.failure}", file=sys.stderr)
    elif run.refused and not run.interrupted:
        for item, reason in run.refused.items():
            print(f"error: {item}: {reason}", file=sys.stderr)
    index = run.index
    missing = [f"{n} {what}" for n, what in ((len(run.unanswered), "unanswered"), (len(run.refused), "refused")) if n]
    print(
        f"wrote {len(run.written)} shards to {out}: {len(index)} rows of {index.embed_dim} dimensions as "
        f"{args.embedding_type}" + (f"; items without a row: {', '.join(missing)} (status column)" if missing else "")
    )
    _stores(args, index, out)
    return _embed_exit(args, run, len(index), len(dict.fromkeys(items)))


def _suffix_counts(skipped: dict[str, str]) -> str:
    from collections import Counter  # noqa: PLC0415

    counts = Counter(Path(path).suffix.lower() or "(none)" for path in skipped)
    return ", ".join(f"{suffix} x{n}" for suffix, n in counts.most_common(6)) + (", ..." if len(counts) > 6 else "")


def _search(args) -> int:
    from clip_triton.client.store import open_index  # noqa: PLC0415

    index = open_index(args.index, use_ann=not args.exact, log=lambda line: print(line, file=sys.stderr))
    _positive(args.k, "-k")
    if args.image is not None:
        _local_images([args.image], "--image")
    with _client(args) as client:
        index.client = client
        hits = index.search_text(args.text, args.k) if args.text is not None else index.search_image(args.image, args.k)
    print(f"  {'rank':<6}{'cosine':>8}  item")
    for place, hit in enumerate(hits, start=1):
        print(f"  {place:<6}{hit.score:>8.4f}  {hit.item}")
    return 0


def _eval(args) -> int:
    from clip_triton.client.zeroshot import ZeroShotTask, evaluate_task  # noqa: PLC0415

    _positive(args.limit, "--limit")
    task = ZeroShotTask.prepare(args.dataset, classnames=args.classnames, template_set=args.templates, limit=args.limit)
    return _evaluation(args, "accuracy", lambda client: evaluate_task(client, task))


def _eval_retrieval(args) -> int:
    from clip_triton.client.retrieval import evaluate_captions, load_captions  # noqa: PLC0415

    _positive(args.limit, "--limit")
    ks = int_list(args.k, "-k")
    dataset = load_captions(args.images, args.captions, args.split)[: args.limit]
    return _evaluation(args, "recall", lambda client: evaluate_captions(client, dataset, ks=ks))


def _evaluation(args, figure: str, run) -> int:
    """Run an evaluation through the deployment; print its table (and write its JSON with --json)."""
    import json  # noqa: PLC0415

    if args.json:
        _writable(args.json, "--json")
    with _client(args) as client:
        result = run(client)
        random_weights = client.facts.random_weights
    print(result.table())
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    if random_weights:
        print(f"NOTE: the served model has RANDOM weights; {figure} is chance level", file=sys.stderr)
    return 0


def add_parsers(sub) -> None:
    p = add_command(sub, "classify", "zero-shot classify images against prompts (ranked table)")
    p.add_argument("images", nargs="+", help="image paths or http(s) URLs")
    p.add_argument("--prompts", nargs="+", required=True, help="one prompt per class")
    p.add_argument(
        "--templates",
        choices=["openai", "simple"],
        default=None,
        help="ensemble each prompt over open_clip's templates (default: the prompts as written)",
    )
    p.add_argument("--top", type=int, default=5, help="rows shown per image")
    p.add_argument(
        "--language",
        default=None,
        help="the prompts' source language for NLLB models (a FLORES-200 code such as fra_Latn; "
        "default: the model's, eng_Latn); `embed --texts` and `search --text` read a >>fra_Latn<< prefix per text",
    )
    client_args(p)
    finish(p, _classify)
    p = add_command(
        sub,
        "embed",
        "embed a folder of images or a text file (one text a line) into an index (.npy + .json, or Parquet "
        "shards); a rerun resumes",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="folder of images (recursive)")
    source.add_argument("--texts", help="UTF-8 file, one text per line")
    p.add_argument(
        "--out",
        required=True,
        help="index to write: NAME.npy and NAME.json (a rerun embeds only the items without a row)",
    )
    p.add_argument(
        "--format",
        choices=["npy", "parquet"],
        default="npy",
        help="npy: NAME.npy + NAME.json; parquet: a folder of part-NNNNN.parquet shards, one row per item "
        "(id, source, embedding, status, reason), the model facts in each file's metadata",
    )
    p.add_argument(
        "--shard-size",
        type=int,
        default=10_000,
        help="--format parquet: items per shard (one shard's rows are in memory at a time; a rerun redoes at "
        "most the shard a stop interrupted)",
    )
    p.add_argument(
        "--embedding-type",
        choices=list(EMBEDDING_TYPES),
        default=DEFAULT_EMBEDDING_TYPE,
        help="--format parquet: store each embedding as this encoding (docs/storage.md: definitions and recall)",
    )
    p.add_argument(
        "--ann",
        nargs="?",
        const="auto",
        choices=["auto", "flat", "hnsw", "ivf"],
        default=None,
        help="also build a FAISS index beside the output (auto: chosen by size), used by `clip-triton search`",
    )
    p.add_argument(
        "--lancedb",
        default=None,
        metavar="DIR",
        help="also write the rows into a LanceDB table in DIR (clip_image/clip_text)",
    )
    p.add_argument("--force", action="store_true", help="start over instead of resuming an existing --out")
    p.add_argument(
        "--skip-errors",
        action="store_true",
        help="exit 0 although the server refused some items (they are listed in the .json either way)",
    )
    p.add_argument(
        "--all-files",
        action="store_true",
        help="--images: try every file by content, not only image suffixes (refused files are "
        "reported like any bad item); without it, other files are skipped and listed",
    )
    client_args(p)
    finish(p, _embed, rules=EMBED_RULES)
    p = add_command(sub, "search", "search an index written by `clip-triton embed` (or EmbeddingIndex.save)")
    p.add_argument(
        "--index",
        required=True,
        help="NAME.npy (or NAME) or the Parquet folder written by `clip-triton embed`; its FAISS index is used "
        "where `embed --ann` built one",
    )
    p.add_argument("--exact", action="store_true", help="search every row exactly, even where a FAISS index exists")
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="query text")
    query.add_argument("--image", help="query image path or http(s) URL")
    p.add_argument("-k", type=int, default=5, help="results to show")
    client_args(p)
    finish(p, _search)
    p = add_command(sub, "eval", "zero-shot top-1/top-5 and per-class accuracy over an ImageFolder dataset")
    p.add_argument("dataset", help="ROOT/CLASS/IMAGE folders")
    p.add_argument(
        "--classnames",
        default="folder",
        help="'folder' (folder names, _ as space), 'imagenet' (open_clip's 1000 names in sorted-wnid "
        "order), a file with one name per line in folder order, or a comma-separated list",
    )
    p.add_argument(
        "--templates",
        default="openai",
        help="'openai' (80), 'simple' (7), 'none' (the class name alone), or a file with one template per "
        "line, {} standing for the class name",
    )
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N images only (default: all)")
    p.add_argument("--json", default=None, help="also write the report as JSON to this file")
    client_args(p)
    finish(p, _eval)
    p = add_command(
        sub,
        "eval-retrieval",
        "image-text retrieval recall@k over an image-caption dataset (COCO or Flickr30k/Karpathy captions JSON)",
    )
    p.add_argument("--images", required=True, help="folder the captions file's image names are relative to")
    p.add_argument(
        "--captions",
        required=True,
        help="COCO captions JSON (images + annotations) or Karpathy JSON (images[].filename, sentences)",
    )
    p.add_argument(
        "--split", default=None, help="Karpathy JSON: evaluate this split only, e.g. test (default: every image)"
    )
    p.add_argument("-k", default="1,5,10", help="comma-separated k of recall@k")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N images only (default: all)")
    p.add_argument("--json", default=None, help="also write the report as JSON to this file")
    client_args(p)
    finish(p, _eval_retrieval)
