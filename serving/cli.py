"""The ``cellsam-stream`` command line: parses arguments, loads configuration, calls library functions.

Exit codes: 0 success, 1 the work failed (no weights, unreadable image, a port in use, frames lost), 2 usage
errors (argparse's convention; also invalid configuration values), 3 ``serve`` stopped with accepted frames
unfinished (they got ``failed: shutdown`` results). Errors are one line on stderr; checks
that need no Ray run before Ray starts (``serving.preflight``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cellsam_core import __version__
from cellsam_core.modalities import MODALITIES

if TYPE_CHECKING:
    from serving.config import ServiceConfig

log = logging.getLogger("cellsam_stream")

#: ``serve`` stopped before every accepted frame was finished.
EXIT_UNFINISHED = 3

_EPILOG = "Run `cellsam-stream COMMAND --help` for the options of a command."


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--weights",
        type=Path,
        help="weights file (official cellsam_general.pt / cellsam_extra.pt or our own); default: "
        "$CELLSAM_WEIGHTS, then the official cache ~/.deepcell/models/cellsam_v{version}/",
    )
    p.add_argument("--model", help="architecture name (cellsam_vit_b, tiny); inferred from the weights")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1 (default: cpu)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="precision of the model (bfloat16 is meant for GPUs)",
    )
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="TESTING ONLY: run a randomly initialised model (default architecture: tiny); "
        "the labels are not a segmentation",
    )


def _cmd_sample(args: argparse.Namespace) -> int:
    from cellsam_core.io import write_labels
    from cellsam_core.synthetic import synthetic_frame

    image, labels = synthetic_frame(
        (args.size, args.size),
        seed=args.seed,
        modality=args.modality,
        n_cells=args.cells,
        cell_radius=tuple(args.cell_radius) if args.cell_radius else None,
    )
    if args.invert:
        image = image.max() - image
    out = Path(args.output)
    import tifffile

    out.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(out, image)
    print(f"wrote sample image {out} ({image.shape}, {image.dtype}, {int(labels.max())} cells)")
    if args.labels:
        write_labels(args.labels, labels)
        print(f"wrote ground-truth labels {args.labels}")
    return 0


def _cmd_segment(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from cellsam_core.errors import CellSAMError
    from cellsam_core.inference import DecodeOptions, EncodeOptions
    from cellsam_core.select import select_model
    from serving.preflight import check_device, segment_jobs

    if args.z_policy is not None and args.axes is None:
        print(
            "error: --z-policy applies to a stack: name its axes with --axes, e.g. --axes ZYX",
            file=sys.stderr,
        )
        return 1
    jobs = segment_jobs(args.images, args.output)
    check_device(args.device)
    try:
        t0 = time.perf_counter()
        model, info = select_model(
            weights=args.weights,
            model=args.model,
            random_weights=args.random_weights,
            device=args.device,
            dtype=args.dtype,
        )
    except (CellSAMError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    t_load = time.perf_counter() - t0
    print(info.describe())
    options = (EncodeOptions(tile=args.tile), DecodeOptions(bbox_threshold=args.bbox_threshold))
    failed = 0
    with tqdm(jobs, unit="file", desc="segment", disable=len(jobs) < 2) as files:
        for image_path, out in files:
            try:
                line = _segment_file(image_path, out, model, args, options, t_load)
            except (CellSAMError, FileNotFoundError, ValueError, OSError) as exc:
                failed += 1
                tqdm.write(f"error: {image_path}: {exc}", file=sys.stderr)
                continue
            tqdm.write(line)
    if len(jobs) > 1:
        print(
            f"{len(jobs) - failed} of {len(jobs)} images segmented" + (f", {failed} failed" if failed else "")
        )
    return 1 if failed else 0


def _segment_file(
    image_path: Path, out: Path, model: Any, args: argparse.Namespace, options: tuple[Any, Any], t_load: float
) -> str:
    """Segment one file and write its labels; returns the report line (cells, timings)."""
    from tqdm import tqdm

    from cellsam_core.inference import segment
    from cellsam_core.io import read_image, write_labels
    from cellsam_core.stacks import label_axes

    encode_options, decode_options = options
    image = read_image(image_path)
    if args.axes is None and image.ndim == 3 and min(image.shape) > 3:
        raise ValueError(
            f"shape {image.shape} is a stack rather than one frame: name its axes with --axes, e.g. "
            "--axes ZYX (z-stack) or --axes TYX (time-lapse)"
        )
    t0 = time.perf_counter()
    if args.axes is not None:
        labels = _segment_stack(image, model, args.axes, args.z_policy, encode_options, decode_options)
        summary, steps = f"{labels.shape} labels ({label_axes(args.axes)})", ""
    else:
        # The mask step of a large (tiled) frame takes minutes on a CPU: show it, box by box.
        with tqdm(unit="box", desc=f"masks {image_path.name}", leave=False, delay=2.0) as bar:

            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            result = segment(
                image, model, encode_options=encode_options, decode_options=decode_options, progress=progress
            )
        labels, summary = result.labels, f"{result.n_cells} cells"
        steps = " (" + ", ".join(f"{k} {v:.2f} s" for k, v in result.timings.items()) + ")"
    t_seg = time.perf_counter() - t0
    try:
        write_labels(out, labels)
    except OSError as exc:
        raise OSError(f"cannot write {out}: {exc.strerror or exc}") from None
    return (
        f"{summary} in {image_path} -> {out}\ntiming: model load {t_load:.2f} s, segment {t_seg:.2f} s{steps}"
    )


def _segment_stack(image: Any, model: Any, axes: str, z_policy: Any, encode: Any, decode: Any) -> Any:
    """Every plane of a stack (or every projection, under a projection z policy), with a progress bar."""
    from tqdm import tqdm

    from cellsam_core.stacks import planes, segment_stack

    total = sum(1 for _ in planes(image, axes))
    if z_policy is not None and z_policy.projects and "Z" in axes.upper():
        total //= image.shape[axes.upper().index("Z")]
    with tqdm(total=total, unit="plane", desc="segment", disable=total < 2) as bar:
        return segment_stack(
            image,
            model,
            axes,
            z_policy=z_policy,
            encode_options=encode,
            decode_options=decode,
            on_plane=lambda _: bar.update(1),
        )


def _z_policy(text: str) -> Any:
    """``--z-policy``: planes, max or plane:N (a usage error otherwise)."""
    from cellsam_core.stacks import ZPolicy

    try:
        return ZPolicy.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _service_config(args: argparse.Namespace) -> ServiceConfig:
    from serving.preflight import load_service_config

    return load_service_config(
        args.config,
        {
            "model.name": args.model,
            "model.weights": str(args.weights) if args.weights else None,
            "model.random_weights": True if args.random_weights else None,
            "model.device": args.device,
            "model.dtype": args.dtype,
            "ingest.endpoint": args.ingest,
            "ingest.live": True if args.live else None,
            "results.endpoint": args.results,
            "output.directory": str(args.output) if args.output else None,
            "metrics.port": args.metrics_port,
            "shutdown.drain_timeout_s": getattr(args, "drain_timeout", None),
            "encoder.replicas": args.encoder_replicas,
            "encoder.num_gpus": args.num_gpus_per_encoder,
            "decoder.replicas": args.decoder_replicas,
            "decoder.num_gpus": args.num_gpus_per_decoder,
            "security.expose": True if args.expose else None,
            "security.curve_secret_key": str(args.curve_secret_key) if args.curve_secret_key else None,
            "security.curve_clients": str(args.curve_clients) if args.curve_clients else None,
            "security.http_token_file": str(args.http_token_file) if args.http_token_file else None,
        },
    )


def _cmd_serve(args: argparse.Namespace) -> int:
    import os

    from serving.preflight import check_service, service_http_host
    from serving.runner import DEFAULT_HTTP_PORT, start_service, wait_for_signal

    config = _service_config(args)
    http_host = service_http_host(config, args.http_host)
    address = args.address or os.environ.get("RAY_ADDRESS")
    check_service(
        config,
        http_host=http_host,
        http_port=DEFAULT_HTTP_PORT if args.http_port is None else args.http_port,
        joining_cluster=bool(address),
    )
    print("starting cellsam-stream (Ray, Serve, model replicas: this takes a few seconds)...", flush=True)
    service = start_service(
        config,
        address=address,
        http_host=http_host,
        http_port=args.http_port,
        replace=args.replace,
        verbose=args.verbose,
    )
    print(f"cellsam-stream is serving; labels go to {config.output.directory}/")
    print(service.describe())
    with wait_for_signal() as stopped:
        print("Ctrl-C (SIGINT) or SIGTERM stops it after finishing the frames in flight.", flush=True)
        signum = stopped.wait()
    deadline = config.shutdown.drain_timeout_s
    print(f"received signal {signum}: finishing the accepted frames (at most {deadline:g} s)...", flush=True)
    report = service.stop(deadline)
    if report is None:
        print("stopped; the drain did not report (see the log above)", file=sys.stderr)
        return EXIT_UNFINISHED
    unfinished = int(report["unfinished"] or 0)
    if unfinished:
        print(
            f"stopped after {report['seconds']:.1f} s; {unfinished} accepted frame(s) were not finished: "
            "they got `failed: shutdown` results and are recorded in their stores (re-send them after a "
            "restart)",
            file=sys.stderr,
        )
        return EXIT_UNFINISHED
    print(f"stopped after {report['seconds']:.1f} s; every accepted frame was finished")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from serving.demo import DemoOptions, format_report, run_demo
    from serving.preflight import check_demo

    check_demo(frames=args.frames, positions=args.positions, fps=args.fps, size=args.size, source=args.source)
    options = DemoOptions(
        frames=args.frames,
        positions=args.positions,
        fps=args.fps,
        shape=(args.size, args.size),
        source=args.source,
        output=args.output,
        model=args.model,
        weights=args.weights,
        random_weights=args.random_weights,
        keep_serving=args.keep_serving,
        view=args.view,
        verbose=args.verbose,
    )
    report = run_demo(options)
    print(format_report(report))
    if not report.complete:
        missing = report.frames_sent - report.ok - report.failed
        print(
            f"error: {report.failed} frame(s) failed and {missing} never came back of {report.frames_sent} "
            "sent; see the log lines above",
            file=sys.stderr,
        )
        return 1
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    from acquisition.security import create_key_pair
    from serving.preflight import PreflightError

    try:
        public, secret = create_key_pair(args.dir, args.name)
    except FileExistsError as exc:
        raise PreflightError(str(exc)) from None
    except OSError as exc:
        raise PreflightError(f"cannot write keys to {args.dir}: {exc.strerror or exc}") from None
    print(f"public key: {public}  (hand it out: the service's to every client, a client's to the service's")
    print("            allowlist directory, security.curve_clients)")
    print(f"secret key: {secret}  (stays with its owner, readable only by it: the service's goes in")
    print("            security.curve_secret_key, a client's in ClientKeys.from_files)")
    return 0


def _tracker_config(args: argparse.Namespace) -> Any:
    """``--config`` (a TrackerConfig as YAML) with the flags on top; usage errors exit 2."""
    import yaml
    from pydantic import ValidationError

    from cellsam_core.tracking_config import TrackerConfig
    from serving.preflight import PreflightError, UsageError, describe_validation_error

    flags = {"max_distance": args.max_distance, "gap_frames": args.gap_frames, "divisions": args.divisions}
    try:
        config = TrackerConfig.from_file(args.config) if args.config is not None else TrackerConfig()
        return TrackerConfig.model_validate(
            config.model_dump() | {k: v for k, v in flags.items() if v is not None}
        )
    except FileNotFoundError:
        raise PreflightError(f"tracker configuration {args.config} does not exist") from None
    except OSError as exc:
        raise UsageError(f"cannot read {args.config}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"{args.config} is not valid YAML: {exc}") from None
    except ValidationError as exc:
        raise UsageError(f"invalid tracker configuration: {describe_validation_error(exc)}") from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _cmd_track(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from acquisition.errors import InvalidAcquisitionIdError
    from acquisition.retrack import retrack_store
    from acquisition.sink_errors import InvalidIdentifierError, SinkError
    from serving.preflight import PreflightError, UsageError

    config = _tracker_config(args)
    with tqdm(unit="frame", desc="track", disable=args.no_progress) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        try:
            summary = retrack_store(args.store, config, positions=args.positions, progress=progress)
        except (InvalidIdentifierError, InvalidAcquisitionIdError) as exc:
            raise UsageError(str(exc)) from None
        except (SinkError, OSError) as exc:
            raise PreflightError(str(exc)) from None
    print(summary.describe())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cellsam-stream",
        description="Live CellSAM cell segmentation for streaming microscopy.",
        epilog=_EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging, and Ray's own log lines in the terminal"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "segment",
        help="segment image files and write their label images",
        description="Segment one or more images (files, or directories of .tif/.tiff/.png/.npy) with one "
        "model load; a progress bar shows the files, and the mask step of large frames. Exit code 1 when "
        "any image failed (the others are still written).",
    )
    p.add_argument("images", type=Path, nargs="+", metavar="IMAGE", help="image files or directories")
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        help="one input: the label image (.tif or .npy; default IMAGE_labels.tif next to it); several "
        "inputs or a directory: the directory for the IMAGE_labels.tif files (default: next to each)",
    )
    _add_model_options(p)
    p.add_argument(
        "--tile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="whole-slide tiling (default: automatic for frames much larger than the model input)",
    )
    p.add_argument("--bbox-threshold", type=float, default=0.4, help="CellFinder box threshold (0.4)")
    p.add_argument(
        "--axes",
        help="axes of a stack, from T P C Z Y X (e.g. ZYX, CYX, TCZYX): every plane is segmented, "
        "channels (C, at most 3) together; the labels keep the other axes",
    )
    p.add_argument(
        "--z-policy",
        type=_z_policy,
        metavar="planes|max|plane:N",
        help="with --axes including Z: segment every z plane (planes, the default), the maximum over z of "
        "each channel (max) or z plane N alone (plane:N, from 0) once per (T, P); the labels keep Z with "
        "size 1. The service's z.policy setting does the same for streamed z-stacks",
    )
    p.set_defaults(func=_cmd_segment)

    p = sub.add_parser(
        "demo",
        help="the whole system live: simulated microscope → service → OME-Zarr (start here)",
        description="Start the service in-process (embedded Ray, loopback sockets), stream a synthetic "
        "live-cell time-lapse through it, show progress, and write labels to an OME-Zarr plus a PNG "
        "montage. Exits 0 only when every frame sent was written.",
    )
    p.add_argument("--frames", type=int, default=12, help="time points per position (12)")
    p.add_argument("--positions", type=int, default=2, help="stage positions (2)")
    p.add_argument("--fps", type=float, default=None, help="camera frame rate (default: as fast as taken)")
    p.add_argument("--size", type=int, default=256, help="frame side in pixels (256)")
    p.add_argument("--source", type=Path, help="play a TIFF/NPY/Zarr time-lapse instead of the synthetic one")
    p.add_argument("--output", type=Path, default=Path("cellsam-demo"), help="output directory")
    p.add_argument("--model", help="architecture name (inferred from the weights)")
    p.add_argument("--weights", type=Path, help="weights file (default: official weights, else bundled)")
    p.add_argument("--random-weights", action="store_true", help="TESTING ONLY: random model weights")
    p.add_argument("--keep-serving", action="store_true", help="keep the service up after the demo")
    p.add_argument("--view", action="store_true", help="open the result in napari (if installed)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("sample", help="write a synthetic cell image (and its ground truth)")
    p.add_argument("output", type=Path, help="TIFF file to write")
    p.add_argument("--labels", type=Path, help="also write the ground-truth labels here")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (256)")
    p.add_argument("--cells", type=int, default=40, help="number of cells (40)")
    p.add_argument(
        "--modality",
        default="nuclear",
        choices=list(MODALITIES),
        help="imaging modality to simulate (docs/models.md describes each)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--invert", action="store_true", help="write max - image: dark objects on a bright field")
    p.add_argument(
        "--cell-radius",
        type=float,
        nargs=2,
        metavar=("MIN", "MAX"),
        help="range of cell radii in pixels (default: 2.5-4.5 %% of the image side, as in training)",
    )
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser(
        "serve",
        help="run the streaming service (ZeroMQ in, Ray Serve, OME-Zarr out)",
        description="Start the service on an embedded local Ray, or on a cluster with --address. "
        "Settings come from --config (YAML; a ServiceConfig or a Serve config file) and the flags below.",
    )
    p.add_argument("--config", type=Path, help="YAML configuration (see deploy/serve_config.local.yaml)")
    p.add_argument("--weights", type=Path, help="weights file (default: $CELLSAM_WEIGHTS, official cache)")
    p.add_argument("--model", help="architecture name (cellsam_vit_b, tiny)")
    p.add_argument("--device", help="torch device of the model replicas (cpu, cuda)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="model precision")
    p.add_argument("--random-weights", action="store_true", help="TESTING ONLY: random model weights")
    p.add_argument("--ingest", help="ZeroMQ address frames arrive on (default tcp://127.0.0.1:5555)")
    p.add_argument("--results", help="ZeroMQ address results are published on (default tcp://127.0.0.1:5556)")
    p.add_argument("--live", action="store_true", help="drop the oldest waiting frames when behind")
    p.add_argument("--output", type=Path, help="directory of the OME-Zarr stores (default ./cellsam-output)")
    p.add_argument("--http-host", help="address of the HTTP routes (127.0.0.1; 0.0.0.0 with --expose)")
    p.add_argument(
        "--http-port", type=int, help="port of the HTTP routes (8000; on a cluster, the running Serve's)"
    )
    p.add_argument("--metrics-port", type=int, help="port of /metrics (9464; 0 picks a free port)")
    p.add_argument(
        "--drain-timeout",
        type=float,
        help="seconds to finish accepted frames on SIGINT/SIGTERM before they fail as `shutdown` (60)",
    )
    p.add_argument("--encoder-replicas", type=int, help="encoder replicas (1)")
    p.add_argument("--decoder-replicas", type=int, help="decoder replicas (1)")
    p.add_argument("--num-gpus-per-encoder", type=float, help="GPUs per encoder replica (fractions allowed)")
    p.add_argument("--num-gpus-per-decoder", type=float, help="GPUs per decoder replica (fractions allowed)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument(
        "--replace", action="store_true", help="with --address: replace a running cellsam application"
    )
    g = p.add_argument_group(
        "exposure and authentication",
        "Everything binds loopback unless --expose. Exposed ZeroMQ sockets need CURVE keys and exposed HTTP "
        "a token (docs/deploy.md, Securing the endpoints).",
    )
    g.add_argument(
        "--expose",
        action="store_true",
        help="open the service beyond this machine: endpoints on 127.0.0.1 bind 0.0.0.0, the embedded Ray "
        "binds the machine's address (security.expose)",
    )
    g.add_argument(
        "--curve-secret-key", type=Path, help="the service's NAME.key_secret (`cellsam-stream keys`)"
    )
    g.add_argument("--curve-clients", type=Path, help="allowed clients: a directory of public *.key files")
    g.add_argument("--http-token-file", type=Path, help="file holding the bearer token HTTP requests need")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser(
        "keys",
        help="make a CURVE key pair (for the service or a client) in ZeroMQ's certificate format",
        description="Write DIR/NAME.key (public) and DIR/NAME.key_secret (secret, mode 0600). Make one pair "
        "for the service and one per client (microscope PC, viewer); put the clients' public keys in the "
        "service's allowlist directory.",
    )
    p.add_argument("name", help="key name, e.g. server or microscope1")
    p.add_argument("--dir", type=Path, default=Path("."), help="directory to write to (default: .)")
    p.set_defaults(func=_cmd_keys)

    p = sub.add_parser(
        "track",
        help="re-track a stored acquisition offline (new track labels, tables, state, lineage)",
        description="Link the done frames of a label store again, position by position and plane by "
        "plane, with the live service's linker and the settings given here, and replace the store's "
        "tracking: labels/tracks, the tracked cell tables, the tracker state and the lineage GEFF "
        "(docs/zarr-layout.md). A finished acquisition stays closed. Exit code 1 when the store cannot "
        "be read or written, 2 for bad options.",
    )
    p.add_argument("store", type=Path, metavar="STORE", help="the store, OUTPUT/ACQUISITION.ome.zarr")
    p.add_argument("--config", type=Path, help="tracker settings (a TrackerConfig as YAML; docs/tracking.md)")
    p.add_argument("--max-distance", type=float, help="largest per-frame move of a cell, pixels (12)")
    p.add_argument("--gap-frames", type=int, help="frames a lost track may be missing and continue (2)")
    p.add_argument(
        "--divisions",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="detect divisions (on by default)",
    )
    p.add_argument("--positions", type=int, nargs="+", metavar="P", help="positions to re-track (all)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_cmd_track)

    from acquisition.simulate_command import add_simulate_arguments, run_simulate_command

    p = sub.add_parser(
        "simulate",
        help="play a time-lapse to the service as a microscope would",
        description="Send start, --frames time points for each of --positions positions, then end, "
        "from a synthetic live-cell movie or a TIFF/NPY/Zarr file.",
    )
    add_simulate_arguments(p)
    p.set_defaults(func=run_simulate_command)

    from cellsam_core._cli_training import add_training_commands
    from cellsam_core._cli_weights import add_weights_commands

    add_weights_commands(sub)
    add_training_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from serving.preflight import PreflightError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except PreflightError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except _runtime_errors() as exc:
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _runtime_errors() -> tuple[type[BaseException], ...]:
    """Failures reported as one line (``--verbose`` shows the traceback): the service did not start, a
    receiver never connected."""
    from acquisition.errors import NotConnectedError
    from serving.runner import StartError

    return (StartError, NotConnectedError)


if __name__ == "__main__":
    sys.exit(main())
