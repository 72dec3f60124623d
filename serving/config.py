"""Configuration of the service: one frozen pydantic model per component, composed in ``ServiceConfig``.

Load from YAML with :meth:`ServiceConfig.from_file`; the CLI overrides fields with flags. The same dict is
the ``args`` of the Serve application in ``deploy/serve_config.yaml``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from acquisition.limits import (
    DEFAULT_MAX_CHANNELS,
    DEFAULT_MAX_FRAME_PIXELS,
    DEFAULT_MAX_OPEN_ACQUISITIONS,
    DEFAULT_MAX_POSITIONS,
    DEFAULT_MAX_TIME_POINTS,
    DEFAULT_MAX_Z_PLANES,
    Limits,
)
from cellsam_core.stacks import ZPolicy
from cellsam_core.tracking_config import TrackerConfig
from serving.addresses import ALL_INTERFACES, LOOPBACK, is_loopback_host, parse_endpoint

__all__ = [
    "AccelerationSettings",
    "AssemblySettings",
    "DecoderSettings",
    "EncoderSettings",
    "IngestSettings",
    "MetricsSettings",
    "ModelSettings",
    "OutputSettings",
    "ResultsSettings",
    "RetrySettings",
    "SecuritySettings",
    "ServiceConfig",
    "ZPolicy",
]

if TYPE_CHECKING:
    from cellsam_core.acceleration import Acceleration
    from cellsam_core.inference import DecodeOptions

#: Default port of ``/metrics``: the OpenTelemetry Prometheus exporter's, not Prometheus' own 9090.
DEFAULT_METRICS_PORT = 9464

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class AccelerationSettings(BaseModel):
    """Fast paths of the encoder and decoder (:class:`cellsam_core.acceleration.Acceleration`, same fields).

    Kept here as plain settings so that loading a configuration does not import torch; the defaults keep
    fp32 + SDPA on a CPU and bf16 + SDPA on CUDA.
    """

    model_config = _FROZEN

    precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Autocast dtype of the transformers: bfloat16, float32, or auto (bf16 on CUDA)."
    )
    attention: Literal["auto", "reference", "sdpa"] = Field(
        "auto", description="Attention through scaled_dot_product_attention (sdpa), as written, or auto."
    )
    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = Field(
        "off", description="torch.compile mode of the encoders and transformers; off runs eager."
    )

    def to_core(self) -> Acceleration:
        """The :class:`cellsam_core.acceleration.Acceleration` these settings mean."""
        from cellsam_core.acceleration import Acceleration

        return Acceleration(**self.model_dump())


class ModelSettings(BaseModel):
    """Which model runs and where."""

    model_config = _FROZEN

    name: str | None = Field(None, description="Architecture (cellsam_vit_b, tiny); inferred from weights.")
    weights: str | None = Field(
        None, description="Weights file; default $CELLSAM_WEIGHTS, then the official cache."
    )
    random_weights: bool = Field(
        False, description="Run a randomly initialised model (tests and smoke runs only)."
    )
    device: str = Field("cpu", description="Torch device of the encoder and decoder: cpu, cuda, cuda:N.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="Weight precision. For bf16 on a GPU prefer acceleration.precision (autocast keeps the "
        "mask logits in float32).",
    )
    acceleration: AccelerationSettings = Field(
        default_factory=AccelerationSettings, description="Fast paths of both model deployments."
    )


class IngestSettings(BaseModel):
    """The ZeroMQ PULL socket frames arrive on, and how much work may be in flight."""

    model_config = _FROZEN

    endpoint: str = Field("tcp://127.0.0.1:5555", description="ZeroMQ address the listener binds.")
    max_concurrent: int = Field(
        8,
        ge=1,
        description="Frames being segmented, published and stored at once (pipeline workers); more "
        "frames wait in the queue.",
    )
    max_queued: int = Field(
        16,
        ge=1,
        description="Accepted frames waiting for a free worker; when full the listener stops reading "
        "and the sender is blocked (or, live, the oldest waiting frame is dropped).",
    )
    live: bool = Field(
        False, description="Live mode: when the queue is full drop the oldest waiting frame (counted)."
    )
    max_frame_bytes: int = Field(
        256 * 1024 * 1024, ge=1, description="Larger frames are rejected with reason too_large."
    )
    rcvhwm: int = Field(4, ge=0, description="ZeroMQ receive high-water mark (messages).")
    max_time_points: int = Field(
        DEFAULT_MAX_TIME_POINTS,
        ge=1,
        description="Frames with a time index at or beyond this are rejected (out_of_range), declared or "
        "not: one frame at t = 2**63 must not grow an acquisition's store to that length. A start "
        "declaring more time points is rejected too.",
    )
    max_positions: int = Field(
        DEFAULT_MAX_POSITIONS,
        ge=1,
        description="Most stage positions (p) of an acquisition, declared or not: a store creates one "
        "series per position when it is opened. Frames at or beyond it, and starts declaring more, are "
        "rejected (out_of_range).",
    )
    max_z_planes: int = Field(
        DEFAULT_MAX_Z_PLANES,
        ge=1,
        description="Most z planes of an acquisition, declared or not (out_of_range beyond).",
    )
    max_channels: int = Field(
        DEFAULT_MAX_CHANNELS,
        ge=1,
        description="Most channels sent as separate frames (sizes.c) a start may declare (out_of_range "
        "beyond). A single (H, W, C) buffer carries at most 16.",
    )
    max_frame_pixels: int = Field(
        DEFAULT_MAX_FRAME_PIXELS,
        ge=1,
        description="Most pixels per frame plane (H * W), on ZeroMQ (too_large beyond) and POST /segment "
        "(413, refused from the image header before decoding).",
    )
    max_open_acquisitions: int = Field(
        DEFAULT_MAX_OPEN_ACQUISITIONS,
        ge=1,
        description="Acquisitions open at once (started or sent a frame, neither ended nor idle-closed); "
        "a start or frame opening one more is rejected (too_many_acquisitions).",
    )
    idle_timeout_s: float | None = Field(
        1800.0,
        gt=0,
        description="Close an open acquisition that received nothing for this long (or for twice its "
        "declared time_interval_s, if longer): its store is closed and its summary published as after "
        "'end'; a later frame re-opens it. null: never.",
    )
    retain_buffers: bool = Field(
        True,
        description="On glibc, keep freed frame buffers in the heap for the next frames (process-wide "
        "malloc thresholds) instead of returning them to the kernel between frames.",
    )

    def limits(self) -> Limits:
        """The :class:`~acquisition.limits.Limits` these settings give the frame listener."""
        return Limits(
            max_time_points=self.max_time_points,
            max_positions=self.max_positions,
            max_z_planes=self.max_z_planes,
            max_channels=self.max_channels,
            max_frame_pixels=self.max_frame_pixels,
            max_open_acquisitions=self.max_open_acquisitions,
            idle_timeout_s=self.idle_timeout_s,
        )


class AssemblySettings(BaseModel):
    """Gathering per-channel frames of one (t, p, z), or under a projection z policy every frame of one
    (t, p), into one frame set (``serving.assembly``)."""

    model_config = _FROZEN

    timeout_s: float = Field(
        30.0,
        gt=0,
        description="A set whose channels (or z planes) have not all arrived this long after its first "
        "frame fails (reason incomplete_channels, or incomplete_stack when a whole z plane is missing), "
        "frame by frame.",
    )
    max_pending_sets: int = Field(
        64,
        ge=1,
        description="Incomplete sets held at once (bounds their memory); beyond it the oldest fails.",
    )


class ResultsSettings(BaseModel):
    """The ZeroMQ PUB socket per-frame results go out on."""

    model_config = _FROZEN

    endpoint: str = Field("tcp://127.0.0.1:5556", description="ZeroMQ address the publisher binds.")
    after_write: bool = Field(
        False,
        description="Publish each frame's result only once its labels are stored. Default: publish as "
        "soon as the frame is segmented (fastest feedback) and store right after; a frame whose write "
        "then fails gets a second, `failed` result (reason `write_error`).",
    )


class OutputSettings(BaseModel):
    """Where labels go."""

    model_config = _FROZEN

    directory: str = Field("cellsam-output", description="One {acquisition}.ome.zarr per acquisition here.")
    write_images: bool = Field(True, description="Store the raw frames next to the labels.")


class MetricsSettings(BaseModel):
    """The Prometheus endpoint (served by the ingress replica)."""

    model_config = _FROZEN

    host: str = Field(
        LOOPBACK,
        description="Address /metrics binds (not authenticated: counts and timings only). Loopback unless "
        "security.expose is set, which turns 127.0.0.1 into 0.0.0.0.",
    )
    port: int = Field(
        DEFAULT_METRICS_PORT,
        ge=0,
        le=65535,
        description="Port of /metrics (9464; 9090 is Prometheus' own); 0 picks a free port.",
    )


class EncoderSettings(BaseModel):
    """Dynamic batching of the encoder deployment (live-tunable through ``user_config``)."""

    model_config = _FROZEN

    replicas: int = Field(1, ge=1, description="Encoder replicas (a serve config may autoscale instead).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per encoder replica; fractions share a GPU.")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources per replica (pins replicas to nodes)."
    )
    max_batch_size: int = Field(4, ge=1, description="Most frames per encoder call.")
    batch_wait_timeout_s: float = Field(
        0.0,
        ge=0,
        description="How long a batch waits to fill before it runs anyway. 0 (default): no wait, a batch "
        "takes the frames that queued while the encoder was busy, so batches grow under load while a "
        "lone frame never waits (each ms here is a ms of feedback latency).",
    )


class DecoderSettings(BaseModel):
    """The decoder deployment."""

    model_config = _FROZEN

    replicas: int = Field(1, ge=1, description="Decoder replicas (a serve config may autoscale instead).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per decoder replica; fractions share a GPU.")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources per replica (pins replicas to nodes)."
    )
    box_batch_size: int | None = Field(
        None, ge=1, description="Boxes per SAM mask-decoder call; None picks a device default."
    )
    bbox_threshold: float = Field(0.4, ge=0, le=1, description="CellFinder base box threshold.")
    window: Annotated[int, Field(ge=1)] | Literal["full"] | None = Field(
        None,
        description="Embedding window (tokens per side) each box is decoded over; 'full' = the whole "
        "embedding; None = the model's default (cellsam-nano 32, official models full). See "
        "cellsam_core.windows.",
    )

    def decode_options(self, acceleration: AccelerationSettings | None = None) -> DecodeOptions:
        """The :class:`cellsam_core.DecodeOptions` these settings mean (one mapping for every segmenter)."""
        from cellsam_core.inference import DecodeOptions

        return DecodeOptions(
            bbox_threshold=self.bbox_threshold,
            box_batch_size=self.box_batch_size,
            window=self.window,
            acceleration=(acceleration or AccelerationSettings()).to_core(),
        )


class RetrySettings(BaseModel):
    """Retries of a frame whose replica died (Ray does not replay requests)."""

    model_config = _FROZEN

    max_attempts: int = Field(3, ge=1, description="Attempts per stage before the frame is failed.")
    backoff_s: float = Field(0.5, ge=0, description="Pause before a retry, doubled each attempt.")


class TrackingSettings(BaseModel):
    """Live tracking: each position's cells linked from frame to frame as frames are segmented."""

    model_config = _FROZEN

    enabled: bool = Field(True, description="Link cells over time and store and publish their tracks.")
    linker: TrackerConfig = Field(
        default_factory=TrackerConfig, description="How cells are linked (see docs/tracking.md)."
    )
    max_wait_s: float = Field(
        20.0,
        gt=0,
        description="How long later frames wait for a missing time point (a frame still being segmented, "
        "retried or sent late) before it is skipped and tracks are linked across it.",
    )
    max_held_frames: int = Field(
        32,
        ge=1,
        description="At most this many frames wait for a missing time point, however short the wait: beyond "
        "it the time point is skipped (bounds the memory held per position).",
    )
    lineage_every: int = Field(
        20, ge=1, description="Rewrite a position's lineage graph (GEFF) every this many linked frames."
    )


class ShutdownSettings(BaseModel):
    """How the service stops (SIGINT/SIGTERM, ``serve.delete``, a pod's termination)."""

    model_config = _FROZEN

    drain_timeout_s: float = Field(
        60.0,
        gt=0,
        description="Time to finish the frames already accepted before the model deployments are removed; "
        "frames unfinished then fail with reason `shutdown` (published and recorded in the store). Keep "
        "it below the Ingress's `graceful_shutdown_timeout_s` on a cluster.",
    )


class SecuritySettings(BaseModel):
    """Who may reach the service: loopback only by default; CURVE for ZeroMQ, a bearer token for HTTP.

    Key files are ZeroMQ's own certificate format, as ``cellsam-stream keys`` (``zmq.auth``) writes them.
    Secrets are named by file or environment variable, never written into this configuration.
    """

    model_config = _FROZEN

    expose: bool = Field(
        False,
        description="Open the service beyond this machine: endpoints configured on 127.0.0.1 (the defaults) "
        "bind all interfaces (0.0.0.0) instead, and an embedded Ray binds the machine's address. Off: "
        "everything, the embedded Ray included, binds loopback, and a non-loopback address is an error. "
        "Name a specific address in an endpoint to bind one interface; write `localhost` to keep one "
        "endpoint on loopback.",
    )
    curve_secret_key: str | None = Field(
        None,
        description="The service's CURVE certificate with its secret key (NAME.key_secret from "
        "`cellsam-stream keys`). Set: the frame and result sockets accept only CURVE clients on the "
        "curve_clients allowlist, and traffic is encrypted.",
    )
    curve_clients: str | None = Field(
        None,
        description="Allowlist of clients: a directory of their public certificates (*.key) or one such "
        "file. Required with curve_secret_key.",
    )
    http_token_file: str | None = Field(
        None, description="File holding the bearer token every HTTP route requires (Authorization: Bearer)."
    )
    http_token_env: str | None = Field(
        None,
        description="Name of an environment variable holding the HTTP bearer token (instead of a file; it "
        "must be set where the Ingress replica runs).",
    )
    allow_unauthenticated: bool = Field(
        False,
        description="With expose: allow ZeroMQ endpoints beyond loopback without CURVE. Only on a network "
        "where every host may send frames and read results (a VPN, the microscope VLAN).",
    )

    @model_validator(mode="after")
    def _check(self) -> SecuritySettings:
        if (self.curve_secret_key is None) != (self.curve_clients is None):
            raise ValueError(
                "security.curve_secret_key and security.curve_clients go together: the service's key pair "
                "and the allowlist of client public keys (make both with `cellsam-stream keys`)"
            )
        if self.http_token_file is not None and self.http_token_env is not None:
            raise ValueError("give the HTTP token as security.http_token_file or http_token_env, not both")
        return self

    @property
    def curve(self) -> bool:
        """CURVE is configured for the ZeroMQ sockets."""
        return self.curve_secret_key is not None

    @property
    def http_token(self) -> bool:
        """HTTP routes require a bearer token."""
        return self.http_token_file is not None or self.http_token_env is not None


def _exposed(data: Any) -> Any:
    """With ``security.expose``, the loopback defaults (127.0.0.1) of the endpoints become 0.0.0.0."""
    if not isinstance(data, dict):
        return data
    security = data.get("security")
    expose = security.get("expose") if isinstance(security, dict) else getattr(security, "expose", False)
    if not expose:
        return data
    data = dict(data)
    for section, key, default in (
        ("ingest", "endpoint", IngestSettings.model_fields["endpoint"].default),
        ("results", "endpoint", ResultsSettings.model_fields["endpoint"].default),
        ("metrics", "host", LOOPBACK),
    ):
        value = data.get(section, {})
        values = dict(value) if isinstance(value, dict) else value.model_dump() if value else {}
        current = values.get(key, default)
        if isinstance(current, str) and (current == LOOPBACK or f"//{LOOPBACK}:" in current):
            values[key] = current.replace(LOOPBACK, ALL_INTERFACES, 1)
            data[section] = values
    return data


class ServiceConfig(BaseModel):
    """Everything the service needs; the ``args`` of ``serving.app:build_app``."""

    model_config = _FROZEN

    model: ModelSettings = Field(default_factory=ModelSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    assembly: AssemblySettings = Field(default_factory=AssemblySettings)
    z: ZPolicy = Field(
        default_factory=ZPolicy,
        description="What of each z-stack is segmented (cellsam_core.stacks.ZPolicy): policy planes "
        "(every plane, labels per (t, p, z)), max_projection or plane (with plane: N), both segmenting and "
        "storing labels once per (t, p) after every z plane of it arrived.",
    )
    results: ResultsSettings = Field(default_factory=ResultsSettings)
    output: OutputSettings = Field(default_factory=OutputSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    encoder: EncoderSettings = Field(default_factory=EncoderSettings)
    decoder: DecoderSettings = Field(default_factory=DecoderSettings)
    retries: RetrySettings = Field(default_factory=RetrySettings)
    tracking: TrackingSettings = Field(default_factory=TrackingSettings)
    shutdown: ShutdownSettings = Field(default_factory=ShutdownSettings)
    security: SecuritySettings = Field(default_factory=SecuritySettings)

    @model_validator(mode="before")
    @classmethod
    def _expose_defaults(cls, data: Any) -> Any:
        return _exposed(data)

    @model_validator(mode="after")
    def _check_exposure(self) -> ServiceConfig:
        ingest = parse_endpoint(self.ingest.endpoint)
        results = parse_endpoint(self.results.endpoint)
        beyond = [e.text for e in (ingest, results) if not e.is_local]
        if not is_loopback_host(self.metrics.host):
            beyond.append(f"metrics.host {self.metrics.host}")
        if beyond and not self.security.expose:
            raise ValueError(
                f"{', '.join(beyond)} binds beyond loopback, and security.expose is off: set it (the CLI's "
                "--expose) to open the service, with CURVE keys for the ZeroMQ sockets (docs/deploy.md, "
                "Securing the endpoints)"
            )
        zmq_open = [e.text for e in (ingest, results) if not e.is_local]
        if zmq_open and not self.security.curve and not self.security.allow_unauthenticated:
            raise ValueError(
                f"{', '.join(zmq_open)} would accept anyone who can reach it: configure CURVE "
                "(security.curve_secret_key + curve_clients, from `cellsam-stream keys`) or, on a trusted "
                "network only, set security.allow_unauthenticated"
            )
        return self

    @classmethod
    def from_file(cls, path: str | Path) -> ServiceConfig:
        """Load a YAML (or JSON) file.

        Accepts a plain ``ServiceConfig`` mapping, a Serve application entry (its ``args:``), or a whole
        Serve config file (the ``args`` of its first application).
        """
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
        if isinstance(data.get("applications"), list) and data["applications"]:
            data = data["applications"][0]
        return cls.model_validate(data.get("args", data))

    def with_overrides(self, overrides: dict[str, Any]) -> ServiceConfig:
        """A copy with dotted-key overrides applied, e.g. ``{"model.device": "cuda"}``."""
        data = self.model_dump()
        for dotted, value in overrides.items():
            if value is None:
                continue
            node = data
            *parents, leaf = dotted.split(".")
            for key in parents:
                node = node[key]
            if leaf not in node:
                raise KeyError(f"unknown setting {dotted!r}")
            node[leaf] = value
        return ServiceConfig.model_validate(data)
