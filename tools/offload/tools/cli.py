"""The `offload` command: run the demo, the edge agent or the cloud service, or calibrate a model.

Each subcommand imports only what it needs, so `offload cloud` runs where only
`offload[cloud]` (torch) is installed and `offload edge` where only
`offload[edge]` (onnxruntime) is.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from offload.oip.address import check_address
from offload.oip.errors import ConfigurationError
from offload.oip.settings import configure_logging, load_settings

EXTRA_HINT = {"torch": "offload[cloud]", "onnxruntime": "offload[edge]"}


def _server_flags(parser: argparse.ArgumentParser, default_port: int) -> None:
    parser.add_argument("--config", type=Path, help="TOML file of settings (flags and environment override it)")
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1; 0.0.0.0 for remote callers)")
    parser.add_argument("--grpc-port", type=int, help=f"gRPC port, 0 for any free one (default {default_port})")
    parser.add_argument("--model-repository", type=Path, help="folder of model folders (default: the bundled demo)")
    parser.add_argument("--max-message-bytes", type=int, help="largest gRPC message (default 64 MiB)")
    parser.add_argument("--grace-seconds", type=float, help="on SIGTERM, time for calls in flight (default 10)")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    parser.add_argument("--tls-cert", type=Path, metavar="FILE", help="serve TLS with this PEM certificate chain")
    parser.add_argument("--tls-key", type=Path, metavar="FILE", help="the unencrypted PEM private key of --tls-cert")
    parser.add_argument(
        "--tls-client-ca", type=Path, metavar="FILE", help="require client certificates signed by these PEM CAs (mTLS)"
    )
    parser.add_argument(
        "--auth-token-file", type=Path, metavar="FILE", help="accepted bearer tokens, one a line; re-read on change"
    )


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
        "tls_cert",
        "tls_key",
        "tls_client_ca",
        "auth_token_file",
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
    edge.add_argument("--cloud", help="the cloud's HOST:PORT (any OIP server); omit to answer on the edge only")
    edge.add_argument("--cloud-timeout-seconds", type=float, help="longest cloud call without a caller deadline (1)")
    edge.add_argument(
        "--cloud-streaming",
        action="store_true",
        default=None,
        help="send the cloud's rows on one ModelStreamInfer stream instead of one call each",
    )
    edge.add_argument("--edge-threads", type=int, help="threads that run edge models (default 1)")
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
    return parser


def _address(text: str) -> str:
    try:
        return check_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1] (a share: 0.15 for 15%)")
    return value


def main(argv: list[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
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
                    options, "cloud", "cloud_timeout_seconds", "cloud_streaming", "edge_threads", *CLOUD_CHANNEL_FLAGS
                ),
            )
            configure_logging(edge_settings.log_level)
            asyncio.run(agent.run(edge_settings))
            return 0
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
                )
            )
            return 0
        from offload.cloud import service
        from offload.cloud.settings import CloudSettings

        cloud_settings = load_settings(CloudSettings, options.config, **_flags(options, "device", "inference_threads"))
        configure_logging(cloud_settings.log_level)
        asyncio.run(service.run(cloud_settings))
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


if __name__ == "__main__":
    sys.exit(main())
