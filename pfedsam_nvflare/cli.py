"""The ``pfedsam`` command."""

from __future__ import annotations

import argparse
import logging
import sys


def _make_data(args: argparse.Namespace) -> int:
    from .data.synthetic import make_sites

    names = make_sites(
        args.out, sites=args.sites, cases=args.cases, size=args.size, depth=args.depth, seed=args.seed,
        fmt=args.format, labels=args.labels,
    )
    print(f"wrote {len(names)} sites ({', '.join(names)}) of {args.cases} cases to {args.out}")
    return 0


def _check_data(args: argparse.Namespace) -> int:
    from .data.checks import report

    text, fit = report(args.root, axis=args.axis)
    print(text)
    return 0 if fit else 1


def _convert(args: argparse.Namespace) -> int:
    from .data.converters import convert_fundus, convert_prostate

    counts = (convert_prostate if args.layout == "prostate" else convert_fundus)(args.source, args.out)
    for site, count in counts.items():
        print(f"{site}: {count} cases")
    print(f"wrote the site layout to {args.out}; check it with: pfedsam check-data {args.out}")
    return 0


def _export_jobs(args: argparse.Namespace) -> int:
    from .flare.jobs import export_jobs

    for path in export_jobs(args.out):
        print(f"wrote {path}")
    return 0


def _allow_list(args: argparse.Namespace) -> int:
    from .flare.site_policy import allow_pfedsam_in

    print(f"allowed pfedsam_nvflare components in {allow_pfedsam_in(args.local_dir)}")
    return 0


def _privacy(args: argparse.Namespace) -> int:
    from .flare.privacy import privacy_status

    print(privacy_status(args.site_workspace))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .flare.demo import run_demo

    _, text = run_demo(args.workspace, method=args.method, num_rounds=args.rounds, dp=args.dp)
    print(text)
    return 0


def _pairs(pairs: list[str], option: str, form: str = "KEY=VALUE") -> dict[str, str]:
    """``["a=1", "b=2"]`` as ``{"a": "1", "b": "2"}``; anything else is an error naming ``option``."""
    settings = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or not key or not value:
            raise ValueError(f"{option} takes {form}, got {pair!r}")
        settings[key] = value
    return settings


def _compare(args: argparse.Namespace) -> int:
    from dataclasses import replace
    from pathlib import Path

    from .flare.compare import Comparison, parse_value, plan_variants
    from .flare.jobs import JOB_DATA, JOB_MODEL

    ablate = {key: [parse_value(v) for v in values.split(",")] for key, values in _pairs(args.ablate, "--ablate").items()}
    comparison = Comparison(
        out=Path(args.out),
        variants=plan_variants([m for m in args.methods.split(",") if m], ablate),
        rounds=args.rounds,
        data=JOB_DATA if args.data is None else replace(JOB_DATA, root=str(Path(args.data).resolve())),
        model=replace(JOB_MODEL, backbone=args.backbone, checkpoint=args.checkpoint),
        changes={key: parse_value(value) for key, value in _pairs(args.set, "--set").items()},
        sites=args.sites.split(",") if args.sites else None,
        resume=args.resume,
        part_rounds=args.part_rounds,
    )
    from .reports import comparison_markdown

    result = comparison.run()
    print(comparison_markdown(result))
    print(f"written: {comparison.out / 'comparison.json'}, {comparison.out / 'comparison.md'}, {comparison.out / 'comparison.png'}")
    return 0 if all(run["status"] == "completed" for run in result["methods"].values()) else 1


def _evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .data.layout import Labels, find_cases
    from .inference import Segmenter, evaluate_cases
    from .inference.evaluate import plot_worst_and_best
    from .model.kept import load_kept_model
    from .reports import evaluation_table

    kept = load_kept_model(args.model)
    root = Path(args.data or kept.about.get("data_root") or "")
    site = args.site or kept.about.get("site")
    if not args.data and not kept.about.get("data_root"):
        raise ValueError("the model file names no data root: pass --data")
    if not site:
        raise ValueError("the model file names no site: pass --site")
    cases = {case.name: case for case in find_cases(root, site)}
    split = kept.about.get("split", {})
    if args.split != "all" and site != kept.about.get("site"):
        raise ValueError(
            f"the model's {args.split} cases are cases of site {kept.about.get('site')!r}, not of {site!r}; use --split all"
        )
    names = sorted(cases) if args.split == "all" else split.get(args.split)
    if names is None:
        raise ValueError(f"the model file records no {args.split} cases; use --split all")
    missing = [name for name in names if name not in cases]
    if missing:
        raise ValueError(f"{args.split} case(s) {', '.join(missing)} of the model file are not in {root / site}")
    chosen, labels = [cases[name] for name in names], Labels.of_root(root)
    segmenter = Segmenter(kept, device=args.device)
    evaluation = evaluate_cases(segmenter, chosen, labels)
    print(evaluation_table(evaluation, f"{site}, {args.split} cases, model {args.model}"))
    out = evaluation.write_csv(args.out or Path(args.model).with_name(f"{Path(args.model).stem}_{site}_{args.split}.csv"))
    print(f"per-case scores: {out}")
    overlays = plot_worst_and_best(segmenter, chosen, labels, evaluation, out.with_name(f"{out.stem}_overlays.png"))
    print(f"worst and best case: {overlays}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from .inference.predict import predict

    run = predict(
        args.model, args.input, args.out, global_only=args.global_only, device=args.device, batch_size=args.batch_size
    )
    print(run.summary(args.out))
    return 0


def _export(args: argparse.Namespace) -> int:
    from .inference.export import export_model

    _, line = export_model(args.model, args.out, personal=args.personal)
    print(line)
    return 0


def _poc(args: argparse.Namespace) -> int:
    from .flare import poc

    if args.action == "prepare":
        privacy = _pairs(args.privacy, "--privacy", "SITE=FILE")
        deployment = poc.prepare_poc(args.workspace, sites=args.sites, privacy=privacy, state_dir=args.state_dir)
        print(f"POC deployment of {', '.join(deployment.sites)} ready in {deployment.kits}")
    elif args.action == "start":
        poc.start_poc(args.workspace)
    else:
        poc.stop_poc(args.workspace)
    return 0


def _submit(args: argparse.Namespace) -> int:
    from nvflare.apis.job_def import RunStatus

    from .flare.poc import poc_deployment
    from .flare.submit import report, run_job

    logging.getLogger("nvflare").setLevel(logging.WARNING)  # the API's connection chatter; progress is printed
    if args.poc_workspace:
        deployment = poc_deployment(args.poc_workspace)
        kit = deployment.kit(deployment.admin)
    else:
        kit = args.startup_kit
    outcome = run_job(args.job, kit, args.results, username=args.username, timeout=args.timeout)
    print(report(outcome))
    return 0 if outcome.status == RunStatus.FINISHED_COMPLETED else 1


def _at_least(minimum: float, kind: type = int):
    """An argparse type: a number of ``kind`` not below ``minimum`` (argparse names the option in its error)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'a whole number' if kind is int else 'a number'}")
        if not value >= minimum:  # also refuses NaN
            raise argparse.ArgumentTypeError(f"{text} is below {minimum}")
        return value

    return parse


COUNT, NON_NEGATIVE, SECONDS = _at_least(1), _at_least(0), _at_least(0.0, float)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pfedsam", description="Personalized federated SAM on NVIDIA FLARE")
    commands = parser.add_subparsers(dest="command", required=True)

    make = commands.add_parser("make-data", help="write deterministic synthetic multi-site data")
    make.add_argument("--out", required=True, help="data root to write")
    make.add_argument("--sites", type=COUNT, default=3)
    make.add_argument("--cases", type=COUNT, default=6, help="cases per site")
    make.add_argument("--size", type=COUNT, default=128, help="image side in pixels")
    make.add_argument("--depth", type=COUNT, default=8, help="slices per NIfTI volume")
    make.add_argument("--seed", type=NON_NEGATIVE, default=0)
    make.add_argument("--format", choices=["nifti", "png"], default="nifti")
    make.add_argument("--labels", type=int, choices=[1, 2], default=1, help="2 adds a nested inner structure")
    make.set_defaults(run=_make_data)

    check = commands.add_parser("check-data", help="validate a data root and summarise each site")
    check.add_argument("root")
    check.add_argument("--axis", type=int, default=2, choices=[0, 1, 2], help="axis 3D volumes are sliced along")
    check.set_defaults(run=_check_data)

    convert = commands.add_parser("convert", help="convert a public multi-site layout into the site layout")
    convert.add_argument("layout", choices=["prostate", "fundus"])
    convert.add_argument("source")
    convert.add_argument("out")
    convert.set_defaults(run=_convert)

    demo = commands.add_parser("demo", help="run the job on LiteMedSAM over generated sites in FLARE's simulator")
    demo.add_argument("--workspace", default="pfedsam_demo", help="simulator workspace root (default ./pfedsam_demo)")
    demo.add_argument(
        "--method", default="pfedsam",
        help="pfedsam (default), pfedsam_kd, pfedsam_nokd, fedavg, local, fedsam or ditto",
    )
    demo.add_argument("--rounds", type=COUNT, default=3)
    demo.add_argument(
        "--dp",
        nargs="?",
        const="client",
        choices=["client", "sgd"],
        help="differential privacy: 'client' (the default of a bare --dp), every site clips and noises its updates "
        "(the pfedsam_dp job); 'sgd', every site trains the global phase under DP-SGD (the pfedsam_dpsgd job)",
    )
    demo.set_defaults(run=_demo)

    poc = commands.add_parser("poc", help="a FLARE POC deployment on this machine (mTLS), ready for pFedSAM jobs")
    poc.add_argument("action", choices=["prepare", "start", "stop"])
    poc.add_argument("--workspace", default="/tmp/pfedsam_poc", help="POC workspace (default /tmp/pfedsam_poc)")
    poc.add_argument("--sites", type=COUNT, default=3, help="prepare: number of sites, named site-1, site-2, ...")
    poc.add_argument(
        "--privacy", action="append", default=[], metavar="SITE=FILE",
        help="prepare: install FILE as SITE's local/privacy.json (repeatable)",
    )
    poc.add_argument("--state-dir", help="prepare: every site keeps its local partition across jobs in STATE_DIR/<site>")
    poc.set_defaults(run=_poc)

    submit = commands.add_parser("submit", help="submit a job with an admin startup kit, wait, download the results")
    submit.add_argument("job", help="job folder, e.g. jobs/pfedsam")
    kit = submit.add_mutually_exclusive_group(required=True)
    kit.add_argument("--startup-kit", help="the admin's startup kit folder (a provisioned deployment)")
    kit.add_argument("--poc-workspace", help="a POC workspace: its project admin's kit is used")
    submit.add_argument("--username", help="the admin's name (default: the kit's folder name)")
    submit.add_argument("--results", default="results", help="folder the results are downloaded into")
    submit.add_argument("--timeout", type=SECONDS, default=0, help="seconds to wait before aborting the job (0: no limit)")
    submit.set_defaults(run=_submit)

    compare = commands.add_parser(
        "compare", help="run methods (or ablations) side by side in FLARE's simulator and tabulate test results"
    )
    compare.add_argument("--data", help="data root (default: the job's generated sites)")
    compare.add_argument("--methods", default="pfedsam,pfedsam_kd,fedavg,local,fedsam,ditto", help="comma-separated")
    compare.add_argument("--rounds", type=COUNT, default=3)
    compare.add_argument("--out", default="comparison", help="folder for comparison.json/.md/.png and the runs")
    compare.add_argument("--backbone", default="lite_medsam", help="lite_medsam (default), tiny, vit_b, vit_l, vit_h")
    compare.add_argument("--checkpoint", help="the backbone's checkpoint (required for vit_*)")
    compare.add_argument("--sites", help="comma-separated site folders of the data root (default: all)")
    compare.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="a ModelConfig or TrainerConfig setting for every run (repeatable), e.g. --set lr_global=1e-3; also "
        "dp_epsilon (DP-SGD) or client_epsilon (GaussianPrivacy): the ε (δ=1e-5) the rounds may spend, inf for none",
    )
    compare.add_argument(
        "--ablate", action="append", default=[], metavar="KEY=V1,V2",
        help="one run per value of a setting and method, e.g. --methods pfedsam --ablate "
        "kd_direction=none,local_to_global or --ablate dp_epsilon=1,3,8,inf",
    )
    compare.add_argument(
        "--resume", action="store_true",
        help="keep the completed runs of an earlier comparison in --out, run the rest (a run cut into parts continues "
        "after its last completed part)",
    )
    compare.add_argument(
        "--part-rounds", type=COUNT, metavar="N",
        help="run each method as jobs of at most N rounds, each continuing the last (the same training as one job), "
        "so that a long run can be stopped and resumed between parts",
    )
    compare.set_defaults(run=_compare)

    evaluate = commands.add_parser("evaluate", help="score a kept model file on a site's cases, per case and label")
    evaluate.add_argument("--model", required=True, help="a site's personalized_model.pt")
    evaluate.add_argument("--data", help="data root (default: the one the model was trained on)")
    evaluate.add_argument("--site", help="site folder (default: the model's site)")
    evaluate.add_argument("--split", default="test", choices=["test", "val", "train", "all"])
    evaluate.add_argument("--out", help="CSV of per-case scores (default: beside the model)")
    evaluate.add_argument("--device", default="auto", help="auto (the GPU where there is one), cpu or cuda[:N]")
    evaluate.set_defaults(run=_evaluate)

    predict = commands.add_parser("predict", help="segment new scans with a kept model, in each scan's own geometry")
    predict.add_argument("--model", required=True, help="a site's personalized_model.pt")
    predict.add_argument("--input", required=True, help="a scan (.nii.gz, .nii, .nrrd, .png), a DICOM series folder, or a folder of them")
    predict.add_argument("--out", required=True, help="folder for the label maps (<name>_seg.nii.gz, <name>_seg.png)")
    predict.add_argument("--global-only", action="store_true", help="the shared global model, without the site's own part")
    predict.add_argument("--device", default="auto", help="auto (the GPU where there is one), cpu or cuda[:N]")
    predict.add_argument("--batch-size", type=COUNT, default=4, help="slices per forward pass")
    predict.set_defaults(run=_predict)

    export_model = commands.add_parser(
        "export", help="a kept model's global model as a plain SAM/LiteMedSAM state dict, LoRA merged"
    )
    export_model.add_argument("--model", required=True, help="a site's personalized_model.pt")
    export_model.add_argument("--out", required=True, help="the state dict file to write")
    export_model.add_argument(
        "--personal", action="store_true", help="the site's personal copy instead (Ditto; not for models with experts)"
    )
    export_model.set_defaults(run=_export)

    export = commands.add_parser("export-jobs", help="write the job folders (the repository's jobs/)")
    export.add_argument("--out", default="jobs")
    export.set_defaults(run=_export_jobs)

    privacy = commands.add_parser("privacy", help="a site's differential-privacy budget across its jobs")
    privacy.add_argument("action", choices=["status"])
    privacy.add_argument("site_workspace", help="the site's workspace (or its privacy_accountant.json)")
    privacy.set_defaults(run=_privacy)

    allow = commands.add_parser("allow-list", help="let a site's FLARE build pfedsam_nvflare components")
    allow.add_argument("local_dir", help="the site's local/ folder (for the simulator: WORKSPACE/local)")
    allow.set_defaults(run=_allow_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .data.layout import DataError
    from .flare.poc import DeploymentError
    from .model import CheckpointError
    from .model.kept import KeptModelError

    try:
        return args.run(args)
    except (DataError, DeploymentError, CheckpointError, KeptModelError, ValueError) as error:
        message = str(error)
    except OSError as error:  # a path that is a file where a folder must be, unwritable, missing
        message = f"{error.strerror or error}" + (f": {error.filename}" if error.filename else "")
    print(f"pfedsam {args.command}: error: {' '.join(message.split())}", file=sys.stderr)  # one line
    return 2


if __name__ == "__main__":
    sys.exit(main())
