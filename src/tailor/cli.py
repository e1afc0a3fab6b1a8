"""`tailor <stage>`: one command per pipeline stage, each a thin call into tailor.stages."""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Tailor specialised networks from one supernet. Each command is one pipeline stage.")

ParamsOpt = Annotated[Path, typer.Option("--params", help="params.yaml to read")]
ForceOpt = Annotated[bool, typer.Option("--force", help="replace an existing output directory even if tailor did "
                                                         "not write it (it is replaced whole)")]
PresetOpt = Annotated[Optional[list[Path]], typer.Option("--preset", help="overlay YAML merged over params (repeatable)")]


StageParamsOpt = Annotated[bool, typer.Option(
    "--stage-params", help="--params holds only this stage's keys (as Kubeflow's split-params step writes them; "
                           "a PyTorchJob's pods get such a file); reading any other key is an error")]


def _params(params: Path, preset: Optional[list[Path]], stage: Optional[str] = None):
    """The params, or with `stage` (--stage-params) the stage's part of them (tailor.config.stage_params)."""
    from tailor.config import ParamsError, load_params, parse_params_yaml, stage_params

    if not stage:
        return load_params(params, preset or [])
    if preset:
        raise ParamsError("--stage-params: the file is one stage's params, already merged; no --preset with it")
    try:
        text = Path(params).read_text()
    except OSError as e:
        raise ParamsError(f"--params {params}: cannot read it ({e.strerror})") from None
    return stage_params(parse_params_yaml(text, str(params)), stage, str(params))


# The commands whose training loop runs data-parallel under torchrun (tailor.distributed).
DISTRIBUTED = ("train-teacher", "train-supernet", "retrain")


def _join(p):
    """Join torchrun's process group, if started by it, on the device the params will train on."""
    import torch

    from tailor import distributed

    distributed.init("cuda" if p.runtime.device != "cpu" and torch.cuda.is_available() else "cpu")
    return p


@app.command("prepare-data")
def prepare_data(params: ParamsOpt = Path("params.yaml"), preset: PresetOpt = None,
                 out: Path = Path("data/prepared"), metrics: Path = Path("metrics/data.json"), force: ForceOpt = False):
    """Build train/val/test splits and the class/superclass tables from the configured source."""
    from tailor import data

    data.prepare_data(_params(params, preset), out, metrics, force)


@app.command("train-teacher")
def train_teacher(params: ParamsOpt = Path("params.yaml"), preset: PresetOpt = None,
                  data: Path = Path("data/prepared"), out: Path = Path("models/teacher.pt"),
                  metrics: Path = Path("metrics/teacher.json"), work_dir: Path = Path("runs/train-teacher"),
                  stage_params: StageParamsOpt = False):
    """Train the largest network of the space alone (the distillation teacher)."""
    from tailor import stages

    p = _params(params, preset, "train-teacher" if stage_params else None)
    stages.train_teacher(_join(p), data, out, metrics, work_dir)


@app.command("train-supernet")
def train_supernet(params: ParamsOpt = Path("params.yaml"), preset: PresetOpt = None,
                   data: Path = Path("data/prepared"), teacher: Path = Path("models/teacher.pt"),
                   out: Path = Path("models/supernet.pt"), metrics: Path = Path("metrics/supernet.json"),
                   work_dir: Path = Path("runs/train-supernet"), stage_params: StageParamsOpt = False):
    """Progressive shrinking with KD from the teacher and superclass dropout."""
    from tailor import stages

    p = _params(params, preset, "train-supernet" if stage_params else None)
    stages.train_supernet(_join(p), data, teacher, out, metrics, work_dir)


@app.command("train-stock")
def train_stock(params: ParamsOpt = Path("params.yaml"), preset: PresetOpt = None,
                data: Path = Path("data/prepared"), out: Path = Path("models/stock"),
                metrics: Path = Path("metrics/stock.json"), work_dir: Path = Path("runs/train-stock"),
                force: ForceOpt = False):
    """Train the stock torchvision MobileNetV3 anchors of stock.models (and specialists) by the same loop."""
    from tailor import stages

    stages.train_stock(_params(params, preset), data, out, metrics, work_dir, force)


@app.command("profile-latency")
def profile_latency(params: ParamsOpt = Path("params.yaml"), preset: PresetOpt = None,
                    data: Path = Path("data/prepared"), out_dir: Path = Path("latency"),
                    metrics: Path = Path("metrics/latency.json"),
                    target: Annotated[Optional[list[str]], typer.Option(
                        "--target", help="a name from latency.targets (repeatable; default: latency.target)")] = None):
    """Measure the latency LUT of each target on this machine; calibrate and validate on whole subnets."""
    from tailor import stages

    stages.profile_latency(_params(params, preset), data, out_dir, metrics, target)


@app.command("search-predictor")
def search_predictor(params: ParamsOpt = Path("params.yaml"), preset: PresetOpt = None,
                     data: Path = Path("data/prepared"), supernet: Path = Path("models/supernet.pt"),
                     out: Path = Path("search/predictor.pt")):
    """Measure random subnets on every superclass and fit OFA's accuracy predictor."""
    from tailor import stages

    stages.search_predictor(_params(params, preset), data, supernet, out)


SuperclassOpt = Annotated[Optional[list[str]], typer.Option(
    "--superclass", help="only these superclasses' scenarios (repeatable; a pipeline fans out over them)")]


def _search(method: str, params: Path, preset, data: Path, supernet: Path, out: Path, predictor=None,
            generator_out=None, superclass=None):
    from tailor import stages

    stages.search(_params(params, preset), method, data, supernet, out, predictor, generator_out, superclass)


@app.command("search-generator")
def search_generator(params: ParamsOpt = Path("params.yaml"), preset: PresetOpt = None,
                     data: Path = Path("data/prepared"), supernet: Path = Path("models/supernet.pt"),
                     out: Path = Path("search/generator.json"), generator_out: Path = Path("search/generator.pt"),
                     superclass: SuperclassOpt = None):
    """Train the EAS architecture generator on the supernet, then tailor every scenario in one pass."""
    _search("generator", params, preset, data, supernet, out, generator_out=generator_out, superclass=superclass)


@app.command("search-random")
def search_random(params: ParamsOpt = Path("params.yaml"), preset: PresetOpt = None,
                  data: Path = Path("data/prepared"), supernet: Path = Path("models/supernet.pt"),
                  out: Path = Path("search/random.json"), superclass: SuperclassOpt = None):
    """Random architectures within each budget, the best per superclass by supernet validation accuracy."""
    _search("random", params, preset, data, supernet, out, superclass=superclass)


@app.command("search-evolution")
def search_evolution(params: ParamsOpt = Path("params.yaml"), preset: PresetOpt = None,
                     data: Path = Path("data/prepared"), supernet: Path = Path("models/supernet.pt"),
                     predictor: Path = Path("search/predictor.pt"), out: Path = Path("search/evolution.json"),
                     superclass: SuperclassOpt = None):
    """OFA's evolutionary search on the accuracy predictor (OFA-V and OFA-T)."""
    _search("evolution", params, preset, data, supernet, out, predictor=predictor, superclass=superclass)


@app.command("search-nsga2")
def search_nsga2(params: ParamsOpt = Path("params.yaml"), preset: PresetOpt = None,
                 data: Path = Path("data/prepared"), supernet: Path = Path("models/supernet.pt"),
                 predictor: Path = Path("search/predictor.pt"), out: Path = Path("search/nsga2.json"),
                 superclass: SuperclassOpt = None):
    """SCARLET's constrained, weighted NSGA-II (accuracy, cost, parameters)."""
    _search("nsga2", params, preset, data, supernet, out, predictor=predictor, superclass=superclass)


@app.command("search-collect")
def search_collect(inputs: Annotated[list[Path], typer.Argument(help="search/<method>.json files")],
                   params: ParamsOpt = Path("params.yaml"), preset: PresetOpt = None,
                   results: Path = Path("search/results.json"), table: Path = Path("search/table.md"),
                   metrics: Path = Path("metrics/search.json")):
    """Merge search results: results.json, a Markdown table for the report, and metrics."""
    from tailor import stages

    stages.search_collect(_params(params, preset), inputs, results, table, metrics)


@app.command("retrain")
def retrain(superclass: Annotated[str, typer.Option(help="the scenario's superclass (a name from the data)")],
            budget: Annotated[float, typer.Option(help="the scenario's budget, in search.cost's unit")],
            arch: Annotated[Optional[str], typer.Option(
                help="architecture string; default: the scenario's arch in retrain.scenarios, else the search's pick")] = None,
            params: ParamsOpt = Path("params.yaml"), preset: PresetOpt = None,
            data: Path = Path("data/prepared"), supernet: Path = Path("models/supernet.pt"),
            search_dir: Annotated[Path, typer.Option(help="where search-collect wrote results.json")] = Path("search"),
            out: Annotated[Optional[Path], typer.Option(help="default: retrain/<superclass>__<budget>/model.pt")] = None,
            metrics: Annotated[Optional[Path], typer.Option(
                help="default: metrics/retrain/<superclass>__<budget>.json")] = None,
            work_dir: Annotated[Optional[Path], typer.Option(help="default: runs/retrain/<superclass>__<budget>")] = None):
    """Retrain one (superclass, budget) scenario's architecture as a network for that superclass's classes."""
    from tailor import stages
    from tailor.space import Arch

    p = _join(_params(params, preset))
    if not math.isfinite(budget) or budget <= 0:
        raise ValueError(f"--budget {budget}: not a budget; it must be a finite number > 0")
    sid = stages.scenario_id(superclass, budget)
    chosen = Arch.parse(arch) if arch else stages.choose_arch(p, search_dir, superclass, budget)
    stages.retrain(p, data, supernet, superclass, budget, chosen, out or Path(f"retrain/{sid}/model.pt"),
                   metrics or Path(f"metrics/retrain/{sid}.json"), work_dir or Path(f"runs/retrain/{sid}"))


@app.command("export")
def export(models: Annotated[Optional[list[Path]], typer.Option(
               "--models", help="retrained checkpoints (repeatable); default: retrain/<scenario>/model.pt "
                                "of every scenario in retrain.scenarios")] = None,
           params: ParamsOpt = Path("params.yaml"), preset: PresetOpt = None,
           data: Path = Path("data/prepared"),
           repo: Annotated[str, typer.Option(help="Triton model repository: a directory or s3://bucket/prefix "
                                                  "(endpoint and credentials from AWS_* variables)")] = "triton",
           onnx_dir: Annotated[Optional[Path], typer.Option(help="also copy <model>.onnx files here")] = Path("onnx"),
           metrics: Path = Path("metrics/export.json"), force: ForceOpt = False):
    """ONNX export (parity-checked) and the Triton model repository of the retrained networks.

    A local --repo or --onnx-dir is replaced whole; one holding files tailor did not write is
    refused unless --force."""
    from tailor import stages
    from tailor.export import S3Error

    p = _params(params, preset)
    if not models:
        from tailor.data import Meta

        models = [Path(f"retrain/{stages.scenario_id(sc, b)}/model.pt")
                  for sc, b in stages.retrain_scenarios(p, Meta.load(data))]
    try:
        stages.export(p, models, data, repo, metrics, onnx_dir, force)
    except S3Error as e:
        print(f"tailor: error: {e}", file=sys.stderr)
        raise typer.Exit(1) from None


@app.command("serve-check")
def serve_check(params: ParamsOpt = Path("params.yaml"), preset: PresetOpt = None,
                repo: Annotated[str, typer.Option(help="the exported repository: a directory or s3://bucket/prefix")] = "triton",
                data: Path = Path("data/prepared"), metrics: Path = Path("metrics/serve.json"),
                url: Annotated[Optional[str], typer.Option(
                    "--url", envvar="TRITON_HTTP_URL",
                    help="HTTP endpoint of a running Triton serving the repository (http://host:8000)")] = None,
                grpc_url: Annotated[Optional[str], typer.Option(
                    "--grpc-url", envvar="TRITON_GRPC_URL", help="its gRPC endpoint (host:8001)")] = None):
    """Serve the exported models on Triton (--url/--grpc-url, else the bundled tritonserver): accuracy, latency."""
    from tailor import stages
    from tailor.serve import ServeCheckError

    try:
        stages.serve_check(_params(params, preset), repo, data, metrics, url, grpc_url)
    except ServeCheckError as e:
        print(f"tailor: serve-check failed (details in {metrics}): {e}", file=sys.stderr)
        raise typer.Exit(1) from None


@app.command("report")
def report(params: ParamsOpt = Path("params.yaml"), preset: PresetOpt = None,
           metrics_dir: Path = Path("metrics"), search_table: Path = Path("search/table.md"),
           out: Path = Path("reports/report.md"), summary: Path = Path("metrics/report.json"),
           lut_dir: Annotated[Path, typer.Option(help="profile-latency's tables, for the chosen networks' "
                                                      "predicted vs measured latency (skipped when absent)")]
           = Path("latency"),
           search_results: Annotated[Optional[Path], typer.Option(
               help="search-collect's results.json, for the search picks in the pictures")] = None,
           plots_dir: Annotated[Optional[Path], typer.Option(
               help="Pareto PNGs and `dvc plots` data; default: plots/ beside --out")] = None):
    """One Markdown report from every stage's metrics, with Pareto pictures and `dvc plots` data."""
    from tailor import stages

    stages.report(_params(params, preset), metrics_dir, search_table, out, summary, lut_dir, search_results,
                  plots_dir)


def _trace_modules(path: Path) -> None:
    """Append the tailor source files this process loaded (one JSON line per command): the tests
    check every dvc.yaml stage lists them all as deps, so a code change re-runs what it affects."""
    import json

    import tailor

    root = Path(tailor.__file__).resolve().parent.parent.parent  # the checkout holding src/
    files = sorted(str(Path(m.__file__).resolve().relative_to(root)) for name, m in list(sys.modules.items())
                   if (name == "tailor" or name.startswith("tailor.")) and getattr(m, "__file__", None))
    with open(path, "a") as f:
        f.write(json.dumps({"command": sys.argv[1] if len(sys.argv) > 1 else "", "modules": files}) + "\n")


def main() -> None:
    """Entry point: known input errors become one line on stderr and exit status 2."""
    import atexit
    import os

    from tailor.config import ParamsError
    from tailor.data import DataError

    if os.environ.get("TAILOR_TRACE_MODULES"):
        atexit.register(_trace_modules, Path(os.environ["TAILOR_TRACE_MODULES"]))
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and (len(sys.argv) < 2 or sys.argv[1] not in DISTRIBUTED):
        print(f"tailor: error: WORLD_SIZE={world} (torchrun), but only {', '.join(DISTRIBUTED)} run data-parallel; "
              "run this command as one process", file=sys.stderr)
        sys.exit(2)
    ok = False
    try:
        # Outside standalone mode typer turns a KeyboardInterrupt in a command into a returned
        # exit code (130) instead of raising it: that code must become the process's status.
        rc = app(standalone_mode=False)
        ok = not (isinstance(rc, int) and rc)
        if isinstance(rc, int) and rc:
            if rc == 130:
                print("tailor: interrupted", file=sys.stderr)
            sys.exit(rc)
    except (ParamsError, DataError, FileNotFoundError, ValueError) as e:
        print(f"tailor: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        print(f"tailor: interrupted ({e})", file=sys.stderr)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:  # click usage errors arrive here in non-standalone mode
        import click

        # typer vendors its own click (typer._click): its usage errors are typer.TyperException
        # subclasses, not click.ClickException.
        if isinstance(e, (click.ClickException, typer.TyperException)) and hasattr(e, "show"):
            e.show()
            sys.exit(e.exit_code)
        raise
    finally:
        from tailor import distributed

        if distributed.world().group:
            distributed.shutdown(wait=ok)  # a failed rank must not wait for ranks torchrun is stopping


if __name__ == "__main__":
    main()
