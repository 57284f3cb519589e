"""The `offload` command: run the demo, the edge agent or the cloud service, calibrate or quantize a model,
distill a new edge model from recorded cloud answers, load a server, or write a repository's manifest.

Each subcommand imports only what it needs, so `offload cloud` runs where only
`offload[cloud]` (torch) is installed and `offload edge` where only
`offload[edge]` (onnxruntime) is.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from offload.oip import event_loop
from offload.oip.address import check_address
from offload.oip.errors import ConfigurationError
from offload.oip.settings import configure_logging, load_settings

EXTRA_HINT = {
    "torch": "offload[cloud]",
    "onnxruntime": "offload[edge]",
    "onnx": "offload[tools]",
}


def _server_flags(parser: argparse.ArgumentParser, default_port: int) -> None:
    parser.add_argument("--config", type=Path, help="TOML file of settings (flags and environment override it)")
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1; 0.0.0.0 for remote callers)")
    parser.add_argument("--grpc-port", type=int, help=f"gRPC port, 0 for any free one (default {default_port})")
    parser.add_argument("--model-repository", type=Path, help="folder of model folders (default: the bundled demo)")
    parser.add_argument(
        "--max-message-bytes", type=int, help="largest gRPC message (default: edge 16 MiB, cloud 64 MiB)"
    )
    parser.add_argument("--grace-seconds", type=float, help="on SIGTERM, time for calls in flight (default 10)")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    parser.add_argument(
        "--log-format", choices=("text", "json"), help="text (default), or json: one JSON object per line"
    )
    parser.add_argument(
        "--metrics-port", type=int, metavar="PORT", help="serve Prometheus metrics on http://HOST:PORT/metrics"
    )
    parser.add_argument("--metrics-host", metavar="HOST", help="address the metrics port listens on (default: --host)")
    parser.add_argument(
        "--health-port", type=int, metavar="PORT", help="also serve grpc.health.v1 alone, plaintext, on this port"
    )
    parser.add_argument(
        "--tracing",
        action="store_true",
        default=None,
        help="export OpenTelemetry traces (needs offload[tracing]; OTEL_* environment variables say where)",
    )
    parser.add_argument("--tls-cert", type=Path, metavar="FILE", help="serve TLS with this PEM certificate chain")
    parser.add_argument("--tls-key", type=Path, metavar="FILE", help="the unencrypted PEM private key of --tls-cert")
    parser.add_argument(
        "--tls-client-ca", type=Path, metavar="FILE", help="require client certificates signed by these PEM CAs (mTLS)"
    )
    parser.add_argument(
        "--auth-token-file", type=Path, metavar="FILE", help="accepted bearer tokens, one a line; re-read on change"
    )
    parser.add_argument(
        "--event-loop",
        choices=("auto", "uvloop", "asyncio"),
        help="asyncio event loop: auto (default: uvloop where installed), uvloop, or asyncio",
    )


# The edge agent's flags for models rolled out over HTTP, named as the edge settings.
ROLLOUT_FLAGS = ("model_repository_url", "model_poll_seconds", "model_cache_dir")

# The edge agent's flags for recording the cloud's answers (opt-in), named as the edge settings.
RECORD_FLAGS = ("record_dir", "record_max_bytes")

# The flags of a channel to the cloud (the edge agent's, calibrate's), named as the edge settings.
CLOUD_CHANNEL_FLAGS = ("cloud_tls_ca", "cloud_tls_cert", "cloud_tls_key", "cloud_tls_server_name", "cloud_token_file")


def _cloud_channel_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cloud-tls-ca", type=Path, metavar="FILE", help="verify the cloud with these PEM CAs (TLS)")
    parser.add_argument("--cloud-tls-cert", type=Path, metavar="FILE", help="PEM client certificate for the cloud")
    parser.add_argument("--cloud-tls-key", type=Path, metavar="FILE", help="unencrypted PEM key of --cloud-tls-cert")
    parser.add_argument(
        "--cloud-tls-server-name", metavar="NAME", help="check the cloud's certificate for this name, not the host"
    )
    parser.add_argument(
        "--cloud-token-file", type=Path, metavar="FILE", help="send this file's first token as a bearer token"
    )


def _flags(options: argparse.Namespace, *names: str) -> dict[str, Any]:
    common = (
        "host",
        "grpc_port",
        "model_repository",
        "max_message_bytes",
        "grace_seconds",
        "log_level",
        "log_format",
        "metrics_port",
        "metrics_host",
        "health_port",
        "tracing",
        "tls_cert",
        "tls_key",
        "tls_client_ca",
        "auth_token_file",
        "event_loop",
    )
    return {name: getattr(options, name) for name in (*common, *names)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="offload",
        description="Hybrid edge-cloud inference: a small model on the device, a large one in the cloud, "
        "routed per row by confidence over the Open Inference Protocol (KServe v2 gRPC).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="run cloud + edge on this machine and route the demo test set",
        description="Start a cloud service and an edge agent on free loopback ports, send the "
        "bundled digits test set through the edge agent's gRPC API, and report accuracy, "
        "offload share and latency per route.",
    )
    demo.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    demo.add_argument("--samples", type=int, help="use only the first N test samples")
    demo.add_argument("--threshold", type=float, help="override the model's routing threshold")

    edge = commands.add_parser(
        "edge",
        help="run the edge agent (the router's gRPC API + the small model)",
        description="Serve the router's OIP gRPC API, run the small ONNX models locally and "
        "forward low-confidence rows to the cloud. Environment: OFFLOAD_EDGE_*.",
    )
    _server_flags(edge, 8001)
    edge.add_argument(
        "--cloud",
        help="the cloud (any OIP server): HOST:PORT; several replicas as HOST:PORT,HOST:PORT,...; or "
        "dns:///NAME:PORT for a replica at every address of NAME; omit to answer on the edge only",
    )
    edge.add_argument("--cloud-timeout-seconds", type=float, help="longest cloud call without a caller deadline (1)")
    edge.add_argument(
        "--cloud-streaming",
        action="store_true",
        default=None,
        help="send the cloud's rows on one ModelStreamInfer stream instead of one call each",
    )
    edge.add_argument("--edge-threads", type=int, help="threads that run edge models (default 1)")
    edge.add_argument(
        "--model-repository-url",
        metavar="URL",
        help="serve the models published at URL (URL/manifest.json, see `offload manifest`), swapping in new "
        "versions as they appear; --model-repository is then served only until a first download succeeds",
    )
    edge.add_argument(
        "--model-poll-seconds", type=float, metavar="S", help="seconds between looks at --model-repository-url (60)"
    )
    edge.add_argument(
        "--model-cache-dir",
        type=Path,
        metavar="DIR",
        help="where the last good repository from the URL is kept for restarts (default: a state folder, "
        "$STATE_DIRECTORY or $XDG_STATE_HOME/offload)",
    )
    edge.add_argument(
        "--record-dir",
        type=Path,
        metavar="DIR",
        help="opt-in: keep the rows sent to the cloud (users' inputs) and its answers in rotating .npz files in "
        "DIR, for `offload distill` (default: off)",
    )
    edge.add_argument(
        "--record-max-bytes", type=int, metavar="N", help="most bytes of recording files in --record-dir (256 MiB)"
    )
    _cloud_channel_flags(edge)

    cloud = commands.add_parser(
        "cloud",
        help="run the cloud service (large PyTorch models over OIP gRPC)",
        description="Serve the [cloud] models of a model repository over OIP gRPC, on CUDA "
        "when available. Environment: OFFLOAD_CLOUD_*.",
    )
    _server_flags(cloud, 8101)
    cloud.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    cloud.add_argument("--inference-threads", type=int, help="threads that run models (default 2)")

    manifest = commands.add_parser(
        "manifest",
        help="write DIR/manifest.json so that edge agents can take the repository DIR from an HTTP server",
        description="Read the model repository DIR (its model folders, each model.toml's name, version and "
        "tensors checked) and write DIR/manifest.json: the repository's version and, per model, every file's "
        "path, size and SHA-256. Publish DIR's files on any HTTP server or "
        "object store, the manifest last; edge agents started with --model-repository-url pointing there fetch "
        "new versions, verify them and swap them in.",
    )
    manifest.add_argument("repository", type=Path, metavar="DIR", help="the model repository folder")
    manifest.add_argument(
        "--version", help="the repository's version (default: a digest of every file's path and SHA-256)"
    )

    calibrate = commands.add_parser(
        "calibrate",
        help="fit a model's temperature and pick its threshold for a target offload or accuracy",
        description="Run the edge model and the cloud model over a validation set, fit the temperature, pick the "
        "routing threshold that reaches the target, print the expected offload rate and accuracy with 95% "
        "intervals, and write threshold and temperature into the model's model.toml (comments kept).",
    )
    calibrate.add_argument("--model-repository", type=Path, help="folder of model folders (default: the bundled demo)")
    calibrate.add_argument("--model", required=True, help="the model to calibrate (its name in the repository)")
    calibrate.add_argument(
        "--data",
        type=Path,
        required=True,
        help="validation .npz: 'inputs' (or one array per input name) and optionally 'labels' "
        "(without labels, the cloud model's answers are the labels)",
    )
    target = calibrate.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-offload", type=_share, metavar="F", help="share of rows to send to the cloud (0-1)")
    target.add_argument(
        "--target-accuracy", type=_share, metavar="F", help="routed accuracy to reach with the least offload (0-1)"
    )
    calibrate.add_argument(
        "--cloud",
        type=_address,
        help="HOST:PORT of a running OIP server for the cloud's answers "
        "(default: run the model's [cloud] section here with PyTorch)",
    )
    _cloud_channel_flags(calibrate)
    calibrate.add_argument("--plot", type=Path, metavar="FILE.png", help="save the accuracy-vs-offload curve here")
    calibrate.add_argument("--no-temperature", action="store_true", help="keep the configured temperature")
    calibrate.add_argument("--dry-run", action="store_true", help="report only; leave model.toml unchanged")
    calibrate.add_argument(
        "--gate",
        action="store_true",
        help="train a learned gate on the data (the chance that the edge's answer is wrong, from its scores), write "
        'it as gate.onnx beside the edge model and route by it: confidence = "gate" (threshold chosen on '
        "cross-fitted scores)",
    )
    calibrate.add_argument("--gate-inputs", action="store_true", help="with --gate: the gate also reads the inputs")
    _quantize_parser(commands)
    _distill_parser(commands)
    _bench_parser(commands)
    return parser


def _address(text: str) -> str:
    try:
        return check_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _quantize_parser(commands: Any) -> None:
    quantize = commands.add_parser(
        "quantize",
        help="make an 8-bit edge model with ONNX Runtime's quantization and write it as a new model version",
        description="Quantize a model's [edge] ONNX file with onnxruntime.quantization (dynamic, or static with "
        "activation ranges from calibration rows), check it loads with the same inputs and outputs, re-choose the "
        "routing threshold for the same offload share on the validation rows, print file size, ONNX Runtime "
        "latency (p50 at batch 1 and --latency-batch), edge and routed accuracy and offload before and after, and "
        "write the new version: in place (edge_int8.onnx, a bumped version and the new threshold in model.toml, "
        "comments kept) or as a copy of the folder (--out-repository, --name). Exit status 2 on bad input.",
    )
    quantize.add_argument("--model-repository", type=Path, help="folder of model folders (default: the bundled demo)")
    quantize.add_argument("--model", required=True, help="the model to quantize (its name in the repository)")
    quantize.add_argument(
        "--data",
        type=Path,
        required=True,
        metavar="FILE.npz",
        help="validation rows ('inputs' or one array per input name, optionally 'labels'): the threshold is "
        "chosen and the before/after figures measured on them",
    )
    quantize.add_argument("--test-data", type=Path, metavar="FILE.npz", help="held-out rows, only reported")
    quantize.add_argument(
        "--mode",
        choices=("dynamic", "static"),
        default="dynamic",
        help="dynamic: 8-bit weights, activations quantized as they come; static: activations too, with ranges "
        "from --calibration-data (default dynamic)",
    )
    quantize.add_argument(
        "--calibration-data", type=Path, metavar="FILE.npz", help="static: rows whose activation ranges set the scales"
    )
    quantize.add_argument("--per-channel", action="store_true", help="one weight scale per output channel")
    quantize.add_argument("--weight-type", choices=("int8", "uint8"), default="int8", help="default int8")
    quantize.add_argument(
        "--format",
        choices=("qdq", "qoperator"),
        help="static: QuantizeLinear/DequantizeLinear pairs around float operators (qdq, default) or QLinear* "
        "operators (qoperator)",
    )
    quantize.add_argument("--activation-type", choices=("int8", "uint8"), help="static: default int8")
    quantize.add_argument(
        "--calibrate-method", choices=("minmax", "entropy", "percentile"), help="static: default minmax"
    )
    quantize.add_argument(
        "--op-types", type=_name_list, default=(), metavar="OP,OP", help="quantize only these ONNX op types (e.g. Gemm)"
    )
    quantize.add_argument(
        "--no-preprocess", action="store_true", help="skip ONNX Runtime's quant_pre_process (shape inference, fusions)"
    )
    quantize.add_argument(
        "--target-offload",
        type=_share,
        metavar="F",
        help="share of rows to send to the cloud (0-1; default: the share the current threshold gives on --data)",
    )
    quantize.add_argument(
        "--fit-temperature", action="store_true", help="refit the temperature too (default: keep the configured one)"
    )
    quantize.add_argument(
        "--out-repository", type=Path, help="write the new version into this repository (default: the model's own)"
    )
    quantize.add_argument("--name", help="the new version's model name (default: the model's; a new folder if changed)")
    quantize.add_argument("--new-version", help="the new version's version (default: the current one plus one)")
    quantize.add_argument(
        "--cloud",
        type=_address,
        help="HOST:PORT of a running OIP server for the cloud's answers "
        "(default: run the model's [cloud] section here with PyTorch)",
    )
    _cloud_channel_flags(quantize)
    quantize.add_argument(
        "--latency-runs",
        type=int,
        default=200,
        metavar="N",
        help="timed runs per model and batch (default 200; 0: none)",
    )
    quantize.add_argument(
        "--latency-batch", type=_positive_int, default=64, metavar="ROWS", help="the larger batch timed (default 64)"
    )


def _name_list(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r} names no op type")
    return names


def _distill_parser(commands: Any) -> None:
    distill = commands.add_parser(
        "distill",
        help="train a new edge model version on the cloud answers an edge agent recorded (--record-dir)",
        description="Knowledge distillation: train the edge architecture the model's [distill] section names "
        "(factory = 'package.module:function', or --factory) on the rows an edge agent recorded, with the cloud's "
        "outputs as soft targets (KL(softmax(cloud/T) || softmax(student/T)) x T^2), optionally mixed with "
        "labelled rows; export it to ONNX, check it under ONNX Runtime, and write the model's next version into "
        "--out: a copy of its folder with the new edge model, version bumped, threshold and temperature "
        "calibrated anew on --data for the target (model.toml's comments kept). Needs torch (offload[cloud]).",
    )
    distill.add_argument("--model-repository", type=Path, help="folder of model folders (default: the bundled demo)")
    distill.add_argument("--model", required=True, help="the model to distill (its name in the repository)")
    distill.add_argument(
        "--records", type=Path, required=True, metavar="DIR", help="the folder an edge agent recorded into"
    )
    distill.add_argument(
        "--data",
        type=Path,
        required=True,
        metavar="FILE.npz",
        help="validation set to calibrate the new model on, as `offload calibrate --data` takes it",
    )
    target = distill.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-offload", type=_share, metavar="F", help="share of rows to send to the cloud (0-1)")
    target.add_argument(
        "--target-accuracy", type=_share, metavar="F", help="routed accuracy to reach with the least offload (0-1)"
    )
    distill.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="repository to write the new version into "
        "(its folder of the model is replaced; may be --model-repository itself)",
    )
    distill.add_argument("--factory", metavar="PKG.MODULE:FN", help="the edge architecture (default: [distill])")
    distill.add_argument("--weights", type=Path, metavar="FILE.pt", help="start from this state_dict (torch.save)")
    distill.add_argument("--save-weights", type=Path, metavar="FILE.pt", help="save the trained state_dict here")
    distill.add_argument(
        "--labelled", type=Path, metavar="FILE.npz", help="labelled rows to train on too ('inputs' and 'labels')"
    )
    distill.add_argument(
        "--alpha", type=_share, default=0.5, help="weight of the labelled rows' cross-entropy (0-1, default 0.5)"
    )
    distill.add_argument("--temperature", type=_positive_float, default=4.0, help="distillation temperature T (4)")
    distill.add_argument("--epochs", type=_positive_int, default=100, help="passes over the recorded rows (100)")
    distill.add_argument("--batch-size", type=_positive_int, default=64, help="rows per step (64)")
    distill.add_argument("--learning-rate", type=_positive_float, default=3e-3, help="AdamW learning rate (0.003)")
    distill.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (0.0001)")
    distill.add_argument(
        "--holdout", type=_share, default=0.1, help="share of recorded rows kept out to measure agreement (0.1)"
    )
    distill.add_argument("--seed", type=int, default=0, help="seed of the split, the initialisation and the batches")
    distill.add_argument("--version", help="the new version (default: the current one + 1)")
    distill.add_argument("--manifest", action="store_true", help="then write --out's manifest.json")
    distill.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    distill.add_argument(
        "--cloud",
        type=_address,
        help="HOST:PORT of a running OIP server for the cloud's answers on --data "
        "(default: run the model's [cloud] section here with PyTorch)",
    )
    _cloud_channel_flags(distill)
    distill.add_argument("--no-temperature", action="store_true", help="keep the configured routing temperature")


def _bench_parser(commands: Any) -> None:
    bench = commands.add_parser(
        "bench",
        help="load any OIP gRPC server (ours, Triton, MLServer) and report throughput and latency",
        description="A load tool in the spirit of Triton's perf_analyzer. Each step holds a load (closed loop: "
        "N workers with one request in flight each; open loop: a fixed request rate, latencies counted from "
        "each request's scheduled send time) for a warm-up and then --duration seconds, and reports requests "
        "and rows per second of successful requests, their p50/p90/p99 latency, and failures by gRPC status. "
        "Exit status 1 when any request failed, 2 when the run cannot start.",
    )
    bench.add_argument("--target", default="127.0.0.1:8001", help="the server's HOST:PORT (default 127.0.0.1:8001)")
    bench.add_argument("--model", "-m", required=True, help="the model to call")
    bench.add_argument("--model-version", default="", help="the model version (default: the server's choice)")
    bench.add_argument("--input", help="the input's name (default: the model's only input, from its metadata)")
    bench.add_argument(
        "--shape",
        type=_int_list,
        help="the whole request's input shape, rows first, e.g. 1,64 (default: the metadata's, open rows as 1)",
    )
    bench.add_argument("--datatype", help="the input's OIP datatype, e.g. FP32 (default: the metadata's)")
    bench.add_argument("--data", type=Path, metavar="FILE.npz", help="send rows of this .npz's 'inputs' array")
    bench.add_argument("--rows", type=_positive_int, help="rows per request (overrides the shape's first dimension)")
    load = bench.add_mutually_exclusive_group()
    load.add_argument(
        "--concurrency", type=_int_list, default=(1,), help="closed-loop steps: workers, e.g. 1,8,64 (default 1)"
    )
    load.add_argument("--rate", type=_float_list, help="open-loop steps: requests per second, e.g. 500,1000")
    bench.add_argument("--duration", type=float, default=10.0, help="measured seconds per step (default 10)")
    bench.add_argument("--warmup", type=float, default=2.0, help="seconds of load before each step counts (default 2)")
    bench.add_argument(
        "--min-requests",
        type=int,
        default=0,
        metavar="N",
        help="count on past --duration until N requests completed (perf_analyzer's count windows; default 0)",
    )
    bench.add_argument(
        "--streaming",
        action="store_true",
        help="send on ModelStreamInfer (Triton's bidirectional stream) instead of ModelInfer",
    )
    bench.add_argument(
        "--parameter",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a request parameter, e.g. offload_route=edge; typed by its look (true/false, integer, number, "
        "string) or as NAME:TYPE=VALUE (bool, int, float, string); repeatable",
    )
    bench.add_argument("--timeout", type=float, default=30.0, help="seconds per request before DEADLINE_EXCEEDED")
    bench.add_argument(
        "--channels", type=_positive_int, default=1, help="gRPC connections per client process (default 1)"
    )
    bench.add_argument(
        "--processes",
        type=_positive_int,
        default=1,
        help="client processes sharing each step (default 1; more when one process's CPU limits the load)",
    )
    bench.add_argument("--csv", type=Path, metavar="FILE", help="write one row per step here")
    bench.add_argument("--json", type=Path, metavar="FILE", help="write the steps as JSON here")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    bench.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def _float_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if any(value <= 0 for value in values):
        raise argparse.ArgumentTypeError(f"{text!r}: rates must be above 0")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not 1 or more")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not above 0")
    return value


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1] (a share: 0.15 for 15%)")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    options = parser.parse_args(argv)
    if options.command == "calibrate" and options.gate_inputs and not options.gate:
        parser.error("--gate-inputs goes with --gate")
    try:
        if options.command == "demo":
            from offload.tools.demo import run_demo

            return run_demo(json_output=options.json, samples=options.samples, threshold=options.threshold)
        if options.command == "edge":
            from offload.edge import agent
            from offload.edge.settings import EdgeSettings

            edge_settings = load_settings(
                EdgeSettings,
                options.config,
                **_flags(
                    options,
                    "cloud",
                    "cloud_timeout_seconds",
                    "cloud_streaming",
                    "edge_threads",
                    *ROLLOUT_FLAGS,
                    *RECORD_FLAGS,
                    *CLOUD_CHANNEL_FLAGS,
                ),
            )
            configure_logging(edge_settings.log_level, edge_settings.log_format)
            event_loop.run(agent.run(edge_settings), edge_settings.event_loop)
            return 0
        if options.command == "bench":
            return _bench(options)
        if options.command == "manifest":
            from offload.oip.manifest import write_manifest

            path, written = write_manifest(options.repository, options.version)
            files = [file for model in written.models for file in model.files]
            models = len(written.models)
            print(
                f"wrote {path}: version {written.version}, {models} model{'s' if models != 1 else ''}, "
                f"{len(files)} files, {sum(file.size for file in files):,} bytes"
            )
            return 0
        if options.command == "quantize":
            return _quantize(options)
        if options.command == "calibrate":
            from offload.models import DEMO_REPOSITORY
            from offload.oip.security import ChannelSecurity
            from offload.router.calibration import Target
            from offload.tools.calibrate import CalibrateOptions, run_calibrate

            cloud_security = ChannelSecurity.load(*(getattr(options, name) for name in CLOUD_CHANNEL_FLAGS))

            run_calibrate(
                CalibrateOptions(
                    repository=options.model_repository or DEMO_REPOSITORY,
                    model=options.model,
                    data=options.data,
                    target=Target("offload", options.target_offload)
                    if options.target_offload is not None
                    else Target("accuracy", options.target_accuracy),
                    cloud=options.cloud,
                    cloud_security=cloud_security,
                    plot=options.plot,
                    fit_temperature=not options.no_temperature,
                    dry_run=options.dry_run,
                    gate=options.gate,
                    gate_inputs=options.gate_inputs,
                )
            )
            return 0
        if options.command == "distill":
            return _distill(options)
        from offload.cloud import service
        from offload.cloud.settings import CloudSettings

        cloud_settings = load_settings(CloudSettings, options.config, **_flags(options, "device", "inference_threads"))
        configure_logging(cloud_settings.log_level, cloud_settings.log_format)
        event_loop.run(service.run(cloud_settings), cloud_settings.event_loop)
        return 0
    except ConfigurationError as exc:
        print(f"offload {options.command}: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        extra = EXTRA_HINT.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"offload {options.command} needs {exc.name}: pip install '{extra}'", file=sys.stderr)
        return 2


def _quantize(options: argparse.Namespace) -> int:
    from offload.models import DEMO_REPOSITORY
    from offload.oip.security import ChannelSecurity
    from offload.tools.quantize import QuantizeOptions, QuantizeSettings, run_quantize

    run_quantize(
        QuantizeOptions(
            repository=options.model_repository or DEMO_REPOSITORY,
            model=options.model,
            data=options.data,
            settings=QuantizeSettings(
                mode=options.mode,
                per_channel=options.per_channel,
                weight_type=options.weight_type,
                quant_format=options.format,
                activation_type=options.activation_type,
                calibrate_method=options.calibrate_method,
                op_types=options.op_types,
                preprocess=not options.no_preprocess,
            ),
            calibration_data=options.calibration_data,
            test_data=options.test_data,
            target_offload=options.target_offload,
            fit_temperature=options.fit_temperature,
            out_repository=options.out_repository,
            name=options.name,
            new_version=options.new_version,
            cloud=options.cloud,
            cloud_security=ChannelSecurity.load(*(getattr(options, name) for name in CLOUD_CHANNEL_FLAGS)),
            latency_runs=options.latency_runs,
            latency_batch=options.latency_batch,
        )
    )
    return 0


def _distill(options: argparse.Namespace) -> int:
    from offload.models import DEMO_REPOSITORY
    from offload.oip.security import ChannelSecurity
    from offload.router.calibration import Target
    from offload.tools.distill import DistillOptions, Training, run_distill

    if options.holdout >= 1.0:
        raise ConfigurationError("--holdout must be below 1 (some recorded rows must be left to train on)")
    run_distill(
        DistillOptions(
            repository=options.model_repository or DEMO_REPOSITORY,
            model=options.model,
            records=options.records,
            data=options.data,
            target=Target("offload", options.target_offload)
            if options.target_offload is not None
            else Target("accuracy", options.target_accuracy),
            out=options.out,
            factory=options.factory,
            weights=options.weights,
            save_weights=options.save_weights,
            labelled=options.labelled,
            training=Training(
                temperature=options.temperature,
                alpha=options.alpha,
                epochs=options.epochs,
                batch_size=options.batch_size,
                learning_rate=options.learning_rate,
                weight_decay=options.weight_decay,
                seed=options.seed,
            ),
            holdout=options.holdout,
            version=options.version,
            cloud=options.cloud,
            cloud_security=ChannelSecurity.load(*(getattr(options, name) for name in CLOUD_CHANNEL_FLAGS)),
            fit_temperature=not options.no_temperature,
            manifest=options.manifest,
            device=options.device,
        )
    )
    return 0


def _bench(options: argparse.Namespace) -> int:
    from offload.tools.bench import BenchOptions, bench_command, parse_parameter

    try:
        parameters = dict(parse_parameter(text) for text in options.parameter)
    except ValueError as exc:
        raise ConfigurationError(f"--parameter: {exc}") from None
    if any(workers < 1 for workers in options.concurrency):
        raise ConfigurationError("--concurrency: workers must be 1 or more")
    if options.duration <= 0 or options.warmup < 0:
        raise ConfigurationError("--duration must be above 0 and --warmup 0 or more")
    if options.data is not None and options.shape is not None:
        raise ConfigurationError("--data and --shape: the file's rows give the shape; use --rows for rows per request")
    bench_options = BenchOptions(
        target=options.target,
        model=options.model,
        model_version=options.model_version,
        input_name=options.input,
        shape=options.shape,
        datatype=options.datatype,
        data=options.data,
        rows=options.rows,
        parameters=parameters,
        concurrency=options.concurrency,
        rates=options.rate or (),
        duration=options.duration,
        warmup=options.warmup,
        min_requests=options.min_requests,
        streaming=options.streaming,
        timeout=options.timeout,
        channels=options.channels,
        processes=options.processes,
        progress=not options.no_progress,
        seed=options.seed,
    )
    return bench_command(bench_options, options.csv, options.json)


if __name__ == "__main__":
    sys.exit(main())
