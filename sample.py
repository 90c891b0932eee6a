"""Sample from a checkpoint: prefill + decode loop in one jitted call (decode/generate.py).

    python sample.py --workdir runs/demo --prompt 'def ' --max_new_tokens 200 [--temperature 0.8]
    python sample.py --checkpoint runs/demo/checkpoints/400 --prompt_file prompts.txt --json
    python sample.py --workdir runs/demo --prompt 'import ' --granularity 4      (MatFormer F/4)
    python sample.py --workdir runs/demo --prompt 'import ' --widths 72,576,144,288  (Mix'n'Match)
    python sample.py --workdir runs/demo --prompt 'def ' --speculative --draft_granularity 8 --gamma 3
                     [--adaptive_threshold 0.5] [--draft_cache separate]  (decode/speculative.py)
    python sample.py --workdir runs/demo --prompt 'def ' --speculative --gamma auto --gamma_max 4
                                                          (γ per round by goodput, decode/goodput.py)
    python sample.py --workdir runs/demo --prompt 'def ' --speculative --drafts 4 --gamma 3     (SpecTr: 4 rows)
    python sample.py --workdir runs/demo --prompt 'def ' --speculative --tree 3,2,1              (RSD-C)
    python sample.py --workdir runs/demo --prompt 'def ' --speculative --tree_beam 4 --tree_depth 3  (RSD-S)
                     [--verifier kseq|recursive|target_only]                    (decode/multidraft.py)
    python sample.py --workdir runs/demo --prompt 'def ' --decoder bild --fallback 0.6 --rollback 5.0 \
                     --max_little_steps 10 [--draft_granularity 8]            (BiLD, decode/bild.py; lossy)
    python sample.py --workdir runs/reasoning_countdown --prompt '3 7 12 goal 30 |' --decoder mfs \
                     --beams 4 --samples 4 [--sigma_rate 0.8 --epsilon 1e-4 --baseline parent_step]
                                                                       (decode/search.py)

Spark models decode with the sparse-gather path unless --no_sparse. --json prints one object:
text (list), prompts, tokens_per_s, stats (per row: new_tokens, ffn_overflow, attn_overflow;
per layer: ffn_density, keys_per_query; checkpoint_step, widths, seconds). With --speculative the
stats are acceptance_rate, tokens_per_round, rounds (and per row: rounds_per_row, drafted,
accepted), draft_widths, gamma (--gamma auto: gamma_chosen per round, goodput_costs and
goodput_switch_cost in seconds, acceptance_estimate per row); compile_seconds in every mode;
multi-draft adds method, verifier, tree_nodes (draft tokens per target forward) and
accepted_per_round. With --decoder bild: per row rounds, little_tokens, drafted, fallbacks,
rollbacks; little_share, tokens_per_round, little_widths and the thresholds.
With a search --decoder (mfs, phi, beam, best_of_n, self_consistency) the text is the answer the
--answer_rule picks (best_of_n: quality, self_consistency: vote) and stats hold the search
accounting (gen_tokens, forward_tokens, prefill_tokens, steps, stop_step, reverted) and every
final beam's text (beams).
"""

import argparse
import dataclasses
import json
import os
import re
import sys
import time

from spark import paths
from spark.cli import main_guard
from spark.errors import ConfigError


def parse_args(argv):
    ap = argparse.ArgumentParser(description="Sample from a checkpoint.")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="training workdir: its latest checkpoint")
    src.add_argument("--checkpoint", help="a checkpoint step directory, WORKDIR/checkpoints/STEP")
    ap.add_argument("--prompt", action="append", default=[], help="repeatable")
    ap.add_argument("--prompt_file", help="one prompt per line")
    ap.add_argument("--max_new_tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    ap.add_argument("--top_k", type=int, default=0)
    ap.add_argument("--top_p", type=float, default=1.0)
    ap.add_argument("--typical_p", type=float, default=1.0, help="locally typical sampling mass (1: off)")
    ap.add_argument("--min_tokens_to_keep", type=int, default=1, help="floor of top-k / top-p / typical")
    ap.add_argument("--seed", type=int, default=0)
    widths = ap.add_mutually_exclusive_group()
    widths.add_argument("--granularity", type=int, default=None, help="MatFormer divisor: 1 full, 8 = F/8")
    widths.add_argument("--widths", help="comma-separated FFN width per layer (Mix'n'Match)")
    ap.add_argument("--no_sparse", action="store_true", help="Spark models: masked dense decode instead")
    ap.add_argument("--huge_pages", action="store_true",
                    help="CPU: back the weights by 2 MB pages first (faster sparse decode; a one-time copy)")
    sp = ap.add_argument_group("speculative decoding (the draft is this checkpoint at smaller FFN widths)")
    sp.add_argument("--speculative", action="store_true")
    drafts = sp.add_mutually_exclusive_group()
    drafts.add_argument("--draft_granularity", type=int, default=None, help="MatFormer divisor (default 8)")
    drafts.add_argument("--draft_widths", help="comma-separated draft FFN width per layer")
    sp.add_argument("--gamma", default=None,
                    help="tokens drafted per round (at most when adaptive; 3), or auto: chosen per round by "
                         "goodput from costs measured at start (decode/goodput.py)")
    sp.add_argument("--gamma_max", type=int, default=None, help="--gamma auto: the largest γ (4)")
    sp.add_argument("--cost_repeats", type=int, default=None,
                    help="--gamma auto: times each round cost is measured (40, at most ~60 s; fewer: a faster "
                         "start, noisier costs)")
    sp.add_argument("--adaptive_threshold", type=float, default=None,
                    help="stop drafting once the estimated chance of a rejection exceeds this")
    sp.add_argument("--draft_cache", default=None, choices=["shared", "separate"], help="default shared")
    md = sp.add_mutually_exclusive_group()
    md.add_argument("--drafts", type=int, default=None, help="SpecTr: this many i.i.d. draft rows of --gamma tokens")
    md.add_argument("--tree", help="RSD-C: children per node at each depth, e.g. 3,2,1")
    md.add_argument("--tree_beam", type=int, default=None, help="RSD-S: beam width (with --tree_depth)")
    sp.add_argument("--tree_depth", type=int, default=None, help="RSD-S: depth of the beam tree")
    sp.add_argument("--verifier", default=None, choices=["kseq", "recursive", "target_only"],
                    help="multi-draft verification (default: kseq for --drafts, recursive for trees)")
    add_search_flags(ap)
    bl = ap.add_argument_group("BiLD, --decoder bild (decode/bild.py; the little model: --draft_granularity / "
                               "--draft_widths, default F/8; --draft_cache)")
    bl.add_argument("--fallback", type=float, default=None, help="α_FB: hand over below this top probability (0.6)")
    bl.add_argument("--rollback", type=float, default=None, help="α_RB: roll back past this big-model NLL (5.0)")
    bl.add_argument("--max_little_steps", type=int, default=None, help="little tokens in a row at most (10)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    return ap.parse_args(argv)


DECODERS = {"plain": None, "bild": None, "mfs": ("mfs", "quality"), "phi": ("phi", "quality"),
            "beam": ("beam", "quality"),
            "best_of_n": ("sample", "quality"), "self_consistency": ("sample", "vote")}
SEARCH_FLAGS = {  # flag: (type, help); defaults are decode.search.SearchConfig's; bool flags take on | off
    "beams": (int, "M beams kept per step"), "samples": (int, "N samples per beam (best_of_n: completions)"),
    "max_steps": (int, "T_max search steps"), "min_steps": (int, "T_min: no early stop before it"),
    "sigma_rate": (float, "MFS prune: keep s >= mean + λ·std"), "phi_sigma_rate": (float, "φ prune: s > mean − k·std"),
    "epsilon": (float, "MFS stop: max advantage <= ε"), "baseline": (str, "parent_F (paper) | parent_step (code)"),
    "rollouts": (int, "R foresight rollouts per survivor"), "foresight_slots": (int, "K foresight buffer (0: M·N/2)"),
    "tau_step": (float, "step temperature"), "tau_foresight": (float, "foresight temperature"),
    "phi_delta": (float, "φ stop: largest answer cluster share"), "step_tokens": (int, "cap on one step's tokens"),
    "prune": (bool, "on | off: the MFS width prune"), "rank": (str, "MFS orders survivors by A (paper) | F"),
    "early_stop": (bool, "on | off: the MFS ε and φ cluster stop rules"),
}


def add_search_flags(ap):
    g = ap.add_argument_group("search decoders (decode/search.py; --temperature finishes the beams)")
    g.add_argument("--decoder", default="plain", choices=list(DECODERS))
    for name, (typ, hlp) in SEARCH_FLAGS.items():
        g.add_argument(f"--{name}", type=str if typ is bool else typ, default=None, help=hlp)
    g.add_argument("--answer_rule", default=None, choices=["quality", "vote"],
                   help="argmax mean log-prob or majority vote over the final beams")
    g.add_argument("--delimiter", default=None, help="the text that ends a step (default: ';' for task "
                                                     "vocabularies, else a newline); must be one token")


def search_config(args):
    """The SearchConfig the flags ask for (None for --decoder plain); flags a decoder does not
    use are errors."""
    used = [f"--{f}" for f in (*SEARCH_FLAGS, "answer_rule", "delimiter") if getattr(args, f) is not None]
    if args.decoder in ("plain", "bild"):
        if used:
            raise ConfigError(f"{', '.join(used)} need a search --decoder")
        return None
    if args.speculative:
        raise ConfigError("--speculative and a search --decoder are different decoders; pick one")
    truncating = [f"--{f}" for f, off in (("top_k", 0), ("top_p", 1.0), ("typical_p", 1.0)) if getattr(args, f) != off]
    if truncating:
        raise ConfigError(f"{', '.join(truncating)}: the search decoders sample at their own temperatures, "
                          "untruncated; these apply to plain, speculative and multi-draft decoding")
    from decode.search import SearchConfig

    method, rule = DECODERS[args.decoder]
    args.answer_rule = args.answer_rule or rule
    kw = {f: getattr(args, f) for f in SEARCH_FLAGS if getattr(args, f) is not None}
    for f in kw:
        if SEARCH_FLAGS[f][0] is bool:
            if kw[f] not in ("on", "off"):
                raise ConfigError(f"--{f} must be on or off, got {kw[f]!r}")
            kw[f] = kw[f] == "on"
    kw.setdefault("step_tokens", min(32, args.max_new_tokens))
    return SearchConfig(method=method, max_gen=args.max_new_tokens, tau_final=args.temperature, **kw)


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        if not os.path.isfile(args.prompt_file):
            raise ConfigError(f"prompt file {args.prompt_file!r} not found")
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                prompts += [line.rstrip("\n") for line in f if line.strip()]
        except UnicodeDecodeError as e:
            raise ConfigError(f"prompt file {args.prompt_file!r} is not UTF-8 (byte {e.start}: "
                              f"{e.object[e.start:e.start + 1]!r})") from None
    for i, p in enumerate(prompts):  # a --prompt with bytes the shell's locale could not decode
        try:
            p.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError(f"prompt {i} is not valid UTF-8") from None
    if not prompts:
        raise ConfigError("give at least one --prompt or --prompt_file")
    if any(not p for p in prompts):
        raise ConfigError("empty prompt")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    return prompts


def resolve_checkpoint(args) -> tuple[str, int | None]:
    if args.workdir:
        return args.workdir, None
    path = paths.path(args.checkpoint.rstrip("/"))
    if not path.is_dir():
        raise ConfigError(f"checkpoint {args.checkpoint!r} not found")
    if not re.fullmatch(r"\d+", path.name) or path.parent.name != "checkpoints":
        raise ConfigError(f"--checkpoint must be WORKDIR/checkpoints/STEP, got {args.checkpoint!r}")
    return str(path.parent.parent), int(path.name)


def pick_widths(model_cfg, widths: str | None, granularity: int | None, flag: str = "--widths"):
    if widths:
        try:
            parsed = tuple(int(w) for w in widths.split(","))
        except ValueError:
            raise ConfigError(f"{flag} must be comma-separated integers, got {widths!r}") from None
        return model_cfg.check_widths(parsed)
    return model_cfg.granularity_widths(granularity or 1)


BILD_FLAGS = ("fallback", "rollback", "max_little_steps")
LITTLE_FLAGS = ("draft_granularity", "draft_widths", "draft_cache")  # BiLD's little model and its cache


def check_bild_flags(args):
    """-> BiLDConfig for --decoder bild (little widths filled in later), else None."""
    used = [f"--{f}" for f in BILD_FLAGS if getattr(args, f) is not None]
    if args.decoder != "bild":
        if used:
            raise ConfigError(f"{', '.join(used)} need --decoder bild")
        return None
    if args.speculative:
        raise ConfigError("--speculative and --decoder bild are different decoders; pick one")
    from decode.bild import BiLDConfig

    kw = {f: getattr(args, f) for f in (*BILD_FLAGS, "draft_cache") if getattr(args, f) is not None}
    return BiLDConfig(**kw)


def check_speculative_flags(args):
    """-> SpecConfig (one draft), MultiDraftConfig (--drafts / --tree / --tree_beam) or None."""
    flags = ("draft_granularity", "draft_widths", "gamma", "gamma_max", "cost_repeats", "adaptive_threshold",
             "draft_cache", "drafts", "tree", "tree_beam", "tree_depth", "verifier")
    used = [f"--{f}" for f in flags if getattr(args, f) is not None
            and not (args.decoder == "bild" and f in LITTLE_FLAGS)]
    if used and not args.speculative:
        raise ConfigError(f"{', '.join(used)} need --speculative")
    from decode.goodput import GoodputConfig
    from decode.goodput_costs import min_new_tokens
    from decode.multidraft import MultiDraftConfig
    from decode.speculative import SpecConfig

    if (args.tree_beam is None) != (args.tree_depth is None):
        raise ConfigError("--tree_beam and --tree_depth go together (RSD-S)")
    multi = args.drafts is not None or args.tree is not None or args.tree_beam is not None
    if args.verifier is not None and not multi:
        raise ConfigError("--verifier needs a multi-draft method: --drafts, --tree or --tree_beam")
    if multi and args.draft_cache == "separate":
        raise ConfigError("multi-draft decoding drafts into the target's cache: --draft_cache separate does not apply")
    if (args.tree is not None or args.tree_beam is not None) and args.gamma is not None:
        raise ConfigError("--gamma sets SpecTr's row length; a tree's depth is --tree's length or --tree_depth")
    auto = args.gamma == "auto"
    if auto and (multi or args.adaptive_threshold is not None or args.draft_cache == "separate"):
        raise ConfigError("--gamma auto chooses one draft's length per round: not with --drafts / trees, "
                          "--adaptive_threshold or --draft_cache separate")
    if (args.gamma_max is not None or args.cost_repeats is not None) and not auto:
        raise ConfigError("--gamma_max and --cost_repeats go with --gamma auto")
    if args.cost_repeats is not None and args.cost_repeats < 1:
        raise ConfigError(f"--cost_repeats must be >= 1, got {args.cost_repeats}")
    if auto:
        args.gamma = 4 if args.gamma_max is None else args.gamma_max
        if args.max_new_tokens < min_new_tokens(args.gamma):
            raise ConfigError(f"--gamma auto measures its round costs in a decode of --max_new_tokens: with γ_max "
                              f"{args.gamma} that needs >= {min_new_tokens(args.gamma)}, got {args.max_new_tokens}")
    elif args.gamma is not None and not re.fullmatch(r"-?\d+", args.gamma):
        raise ConfigError(f"--gamma must be an integer or auto, got {args.gamma!r}")
    args.gamma = 3 if args.gamma is None else int(args.gamma)
    args.goodput = auto
    if args.drafts is not None:
        return MultiDraftConfig("spectr", drafts=args.drafts, length=args.gamma, verifier=args.verifier,
                                adaptive_threshold=args.adaptive_threshold)
    if args.tree is not None:
        try:
            branching = tuple(int(x) for x in args.tree.split(","))
        except ValueError:
            raise ConfigError(f"--tree must be comma-separated integers like 3,2,1, got {args.tree!r}") from None
        return MultiDraftConfig("rsd_c", branching=branching, verifier=args.verifier,
                                adaptive_threshold=args.adaptive_threshold)
    if args.tree_beam is not None:
        return MultiDraftConfig("rsd_s", beam=args.tree_beam, depth=args.tree_depth, verifier=args.verifier,
                                adaptive_threshold=args.adaptive_threshold)
    args.draft_cache = args.draft_cache or "shared"
    goodput = GoodputConfig((1.0,) * (args.gamma + 1)) if auto else None  # the costs: measured in main
    return SpecConfig(gamma=args.gamma, adaptive_threshold=args.adaptive_threshold, draft_cache=args.draft_cache,
                      goodput=goodput)


def main(argv=None):
    args = parse_args(argv)
    prompts = read_prompts(args)
    bild_cfg = check_bild_flags(args)
    spec_cfg = check_speculative_flags(args)
    scfg = search_config(args)
    workdir, step = resolve_checkpoint(args)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from decode import bild, multidraft, speculative
    from decode.generate import generate
    from decode.sampling import SamplerConfig
    from spark import train_lib
    from spark.data.pipeline import get_tokenizer
    from spark.train import load_checkpoint

    sampler = SamplerConfig(args.temperature, args.top_k, args.top_p, args.typical_p, args.min_tokens_to_keep)
    cfg, params, step = load_checkpoint(workdir, step)
    if args.huge_pages:
        from spark.kernels import hugepages
        t0 = time.perf_counter()
        moved = hugepages.collapse(params)
        print(f"huge pages: {moved / 1e9:.2f} GB of weights in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    widths = pick_widths(cfg.model, args.widths, args.granularity)
    draft_widths = (pick_widths(cfg.model, args.draft_widths, args.draft_granularity or 8, "--draft_widths")
                    if args.speculative or bild_cfg else None)
    tok = get_tokenizer(cfg.data, workdir)
    encoded = [tok.encode(p, bos=True) for p in prompts]
    ctx = cfg.model.max_seq_len
    for i, e in enumerate(encoded):
        if len(e) + args.max_new_tokens > ctx:
            raise ConfigError(f"prompt {i} is {len(e)} tokens; with --max_new_tokens {args.max_new_tokens} that "
                              f"exceeds the model's context of {ctx} (model.max_seq_len)")
    t = max(len(e) for e in encoded)
    arr = np.full((len(encoded), t), tok.pad_id, np.int32)
    for i, e in enumerate(encoded):
        arr[i, : len(e)] = e
    lengths = jnp.asarray([len(e) for e in encoded], jnp.int32)
    kw = dict(max_new_tokens=args.max_new_tokens, sampler=sampler, eos_id=tok.eos_id, pad_id=tok.pad_id,
              widths=widths, sparse=not args.no_sparse)
    fn = generate
    if isinstance(spec_cfg, multidraft.MultiDraftConfig):
        kw.update(md=dataclasses.replace(spec_cfg, draft_widths=draft_widths))
        fn = multidraft.generate
    elif args.speculative:
        kw.update(spec=dataclasses.replace(spec_cfg, draft_widths=draft_widths))
        fn = speculative.fixed_generate  # jitted (the goodput decoder: below)
    elif bild_cfg is not None:
        kw.update(bild=dataclasses.replace(bild_cfg, little_widths=draft_widths))
        fn = bild.generate
    else:
        kw["scan_prefill"] = cfg.train.scan_layers  # a config that trains scanned prefills scanned too
    run_args = (params, jnp.asarray(arr), lengths, jax.random.key(args.seed))
    if scfg is not None:
        return run_search(args, scfg, cfg, tok, prompts, run_args, widths, step)
    measure_s = None
    if args.goodput:  # the cost model of this batch size and prompt length, measured now (this compiles)
        from decode import goodput_costs

        t0 = time.perf_counter()
        costs, switch = goodput_costs.measure_costs(train_lib.graphdef_of(cfg), *run_args[:3], **kw,
                                                    repeats=args.cost_repeats or goodput_costs.REPEATS)
        measure_s = time.perf_counter() - t0
        fn, run_args = speculative.goodput_generate, (*run_args, jnp.asarray(costs, jnp.float32),
                                                      jnp.int32(args.max_new_tokens), jnp.float32(switch))
        kw.update(spec=speculative.goodput_static(kw["spec"]))
    # compile first (the static graphdef is baked in), so the timing is the generation only
    t0 = time.perf_counter()
    compiled = fn.lower(train_lib.graphdef_of(cfg), *run_args, **kw).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out, n_new, stats = jax.block_until_ready(compiled(*run_args))
    dt = time.perf_counter() - t0
    n_new = np.asarray(n_new)
    texts = [tok.decode(row[:n]) for row, n in zip(np.asarray(out), n_new, strict=True)]
    stats = {k: np.asarray(v).tolist() for k, v in stats.items()}
    stats.update(checkpoint_step=step, widths=list(widths), new_tokens=n_new.tolist(), seconds=dt,
                 compile_seconds=compile_s)
    if args.speculative:  # rounds: all rows together; the per-row counts keep their own names
        stats.update(rounds_per_row=stats["rounds"], rounds=int(sum(stats["rounds"])),
                     draft_widths=list(draft_widths), gamma=args.gamma)
        if args.goodput:
            stats.update(gamma_chosen=[g for g in stats["gamma_chosen"] if g >= 0], goodput_costs=list(costs),
                         goodput_switch_cost=switch, cost_measure_seconds=measure_s)
        if isinstance(spec_cfg, multidraft.MultiDraftConfig):
            stats.update(method=spec_cfg.method, verifier=spec_cfg.verifier, gamma=len(spec_cfg.levels) - 1,
                         accepted_per_round=sum(stats["accepted"]) / max(stats["rounds"], 1))
    if bild_cfg is not None:
        stats.update(little_widths=list(draft_widths), fallback=bild_cfg.fallback, rollback=bild_cfg.rollback,
                     max_little_steps=bild_cfg.max_little_steps)
    if args.json:
        print(json.dumps({"text": texts, "prompts": prompts, "tokens_per_s": float(n_new.sum()) / dt,
                          "stats": stats}))
    else:
        for p, txt in zip(prompts, texts, strict=True):
            print(f"--- {p!r}\n{p}{txt}")
        print(f"[{int(n_new.sum())} tokens in {dt:.2f}s ({n_new.sum() / dt:.0f} tokens/s) from step {step}]",
              file=sys.stderr)
        if args.speculative:
            print(f"[speculative: acceptance {stats['acceptance_rate']:.2f}, {stats['tokens_per_round']:.2f} "
                  f"tokens/round, {stats['rounds']} rounds]", file=sys.stderr)
            if args.goodput:
                print(f"[goodput: γ per round {stats['gamma_chosen']}, round costs "
                      f"{[round(c * 1e3, 2) for c in stats['goodput_costs']]} ms for γ = 0..{args.gamma}, a change of "
                      f"γ and back {stats['goodput_switch_cost'] * 1e3:.2f} ms]",
                      file=sys.stderr)
        if bild_cfg is not None:
            print(f"[bild: {stats['little_share']:.2f} of the tokens from the little model, "
                  f"{sum(stats['fallbacks'])} fallbacks, {sum(stats['rollbacks'])} rollbacks]", file=sys.stderr)


def step_delimiter(tok, text: str | None) -> int:
    """The token id that ends a step: the text's single token as it appears after other text
    (SentencePiece would prefix a bare "\n" with a word-boundary piece)."""
    if text is None and hasattr(tok, "delim_id"):
        return tok.delim_id
    text = "\n" if text is None else text
    base, ids = list(tok.encode("a")), list(tok.encode("a" + text))
    if ids[: len(base)] != base or len(ids) != len(base) + 1:
        raise ConfigError(f"the step delimiter {text!r} is not one token after other text; it must be one")
    return int(ids[-1])


def run_search(args, scfg, cfg, tok, prompts, run_args, widths, step):
    import jax
    import numpy as np

    from decode import search
    from spark import train_lib

    task = search.TaskTokens(delim_id=step_delimiter(tok, args.delimiter), eos_id=tok.eos_id, pad_id=tok.pad_id,
                             answer_span="all")
    kw = dict(cfg=scfg, task=task, widths=widths, sparse=not args.no_sparse)
    compiled = search.run.lower(train_lib.graphdef_of(cfg), *run_args, **kw).compile()
    t0 = time.perf_counter()
    out = jax.tree.map(np.asarray, jax.block_until_ready(compiled(*run_args)))
    dt = time.perf_counter() - t0
    pick = out[f"choice_{args.answer_rule}"]
    text = lambda b, j: tok.decode(out["tokens"][b, j, : out["num"][b, j]])  # noqa: E731
    texts = [text(b, pick[b]) for b in range(len(prompts))]
    stats = {k: v.tolist() for k, v in out["stats"].items()}
    stats.update(checkpoint_step=step, widths=list(widths), seconds=dt, decoder=args.decoder,
                 answer_rule=args.answer_rule, quality=out["quality"].tolist(),
                 beams=[[text(b, j) for j in range(out["valid"].shape[1]) if out["valid"][b, j]]
                        for b in range(len(prompts))])
    if "stop_step" in out:
        stats.update(stop_step=out["stop_step"].tolist(), reverted=out["reverted"].tolist())
    gen = float(np.sum(out["stats"]["gen_tokens"]))
    if args.json:
        print(json.dumps({"text": texts, "prompts": prompts, "tokens_per_s": gen / dt, "stats": stats}))
    else:
        for p, txt in zip(prompts, texts, strict=True):
            print(f"--- {p!r}\n{p}{txt}")
        print(f"[{args.decoder}: {int(gen)} tokens generated in {dt:.2f}s, answer by {args.answer_rule}, "
              f"from step {step}]", file=sys.stderr)


if __name__ == "__main__":
    main_guard(main)
