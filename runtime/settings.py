"""The server's settings: one typed object, filled from (lowest to highest
precedence) its defaults, the ``--config-file``, ``A2E_*`` environment
variables and command-line flags.

Every field maps to a flag ``--field-name`` and a variable ``A2E_FIELD_NAME``;
the config file may set any field by its name (``weight`` as upstream does;
its ``model`` is the network's description, so the model choice is a flag).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, get_type_hints

from a2e.config import read_config
from a2e.errors import ConfigError

from . import store_address

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = "configs/lam_audio2exp_config_streaming.py"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


@dataclass
class Settings:
    host: str = field(default="0.0.0.0", metadata={"help": "address to bind"})
    port: int = field(default=8000, metadata={"help": "port to listen on"})
    config_file: str = field(default=DEFAULT_CONFIG, metadata={"help": "model config file (upstream-style Python, never executed)"})
    weight: str | None = field(default=None, metadata={"help": "model weights: a file (.tar/.pth pickle or .safetensors), or hf://OWNER/REPO[@REVISION][/FILE] from the Hugging Face Hub (hf://3DAIGC/LAM_audio2exp: the released model, downloaded once and cached); overrides the config file"})
    model: str = field(default="auto", metadata={"help": "auto (LAM-A2E when its weights are there, else a2e-lite), lam, a2e-lite, or stub (constant frames, for measuring the server)"})
    lite_weight: str = field(default="pretrained_models/a2e-lite.safetensors", metadata={"help": "a2e-lite weights (shipped)"})
    log_level: str = field(default="info", metadata={"help": "one of " + ", ".join(LOG_LEVELS)})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N (the device of a single-process server)"})
    workers: str = field(default="auto", metadata={"help": "HTTP worker processes (with one engine process per device); 0 runs HTTP and the model in one process; auto: 0 without CUDA, else min(8, cores - 2)"})
    devices: str = field(default="auto", metadata={"help": "with --workers: one engine process per listed device, e.g. cuda:0,cuda:1 or cpu,cpu (auto: --device)"})
    dtype: str = field(default="fp32", metadata={"help": "model precision: fp32 (exact), bf16 or fp16"})
    max_sessions: int = field(default=1000, metadata={"help": "open streaming sessions at most (per engine; across the cluster with a redis state store)"})
    session_idle_timeout_s: float = field(default=300.0, metadata={"help": "close a session idle this long (seconds)"})
    max_upload_mb: float = field(default=50.0, metadata={"help": "largest request body (MB)"})
    max_audio_s: float = field(default=600.0, metadata={"help": "longest whole-clip audio (seconds)"})
    max_chunk_s: float = field(default=10.0, metadata={"help": "longest streaming chunk (seconds)"})
    single_pass_max_s: float = field(default=60.0, metadata={"help": "clips up to this length run in one pass; longer ones in windows"})
    context_mode: str = field(default="continuous", metadata={"help": "default streaming context: continuous or reference"})
    max_batch: int = field(default=8, metadata={"help": "windows per model batch at most (1 turns batching off)"})
    max_wait_ms: float = field(default=5.0, metadata={"help": "wait this long for a batch to fill when the device is idle"})
    max_queue: int = field(default=512, metadata={"help": "windows waiting for the model at most; beyond it 503 + Retry-After"})
    cuda_graphs: bool = field(default=True, metadata={"help": "capture CUDA graphs per batch size (CUDA only)"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model before capture"})
    loudness: str = field(default="off", metadata={"help": "level robustness: off (the reference), gates or normalize"})
    loudness_target_lufs: float = field(default=-21.0, metadata={"help": "target loudness for the gates/normalize modes (LUFS)"})
    separation_model: str = field(default="htdemucs", metadata={"help": "Demucs model for ex_vol=true"})
    separation_model_dir: str | None = field(default=None, metadata={"help": "local directory with the Demucs model files (else Demucs downloads them on first use)"})
    separation_preload: bool = field(default=False, metadata={"help": "load the separation model at start-up instead of on first use"})
    separation_max_s: float = field(default=120.0, metadata={"help": "longest audio for ex_vol=true (seconds)"})
    separation_queue: int = field(default=4, metadata={"help": "ex_vol requests running or waiting at most; beyond it 503"})
    response_timeout_s: float = field(default=60.0, metadata={"help": "longest time a request may take; its work is cancelled after it"})
    auto_limits: bool = field(default=True, metadata={"help": "lower max-audio-s/max-chunk-s to what the model can process within half the response timeout (measured at start-up)"})
    max_queue_wait_s: float = field(default=15.0, metadata={"help": "refuse work (503) when the queue already holds this much estimated model time"})
    header_timeout_s: float = field(default=10.0, metadata={"help": "longest time from a request's first byte to the end of its headers"})
    body_idle_timeout_s: float = field(default=10.0, metadata={"help": "longest silence while a request body is read"})
    body_min_rate_kb: float = field(default=64.0, metadata={"help": "slowest body upload accepted (KiB/s, after body-idle-timeout-s of grace)"})
    keep_alive_timeout_s: float = field(default=30.0, metadata={"help": "close idle keep-alive connections after this"})
    max_connections: int = field(default=1000, metadata={"help": "open connections at most (also kept below the open-files limit)"})
    max_concurrent_clips: int = field(default=4, metadata={"help": "whole clips decoded, animated and encoded at once; more wait holding only their upload"})
    upload_memory_mb: float = field(default=128.0, metadata={"help": "request bodies held in memory at once (MB); beyond it 503 + Retry-After"})
    graceful_shutdown_s: float = field(default=15.0, metadata={"help": "on SIGTERM, time to finish in-flight requests (the rest answer 503)"})
    max_sessions_per_client: int = field(default=100, metadata={"help": "open streaming sessions per client address (per engine; across the cluster with a redis state store)"})
    state: str = field(default="memory", metadata={"help": "where streaming sessions live: memory (this engine's; a session stays where it was opened), redis://[:PASSWORD@]HOST:PORT/DB (shared: any node serves any chunk, a lost node or engine loses no session, session limits count across the cluster), redis+sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE[/DB] (the primary Sentinel names, followed across failovers); redis+cluster:// is refused until a session's keys share one hash slot"})
    state_ack: str = field(default="primary", metadata={"help": "when a chunk counts as stored: primary (its write landed on the primary; a failover may roll the session back, which clients replay) or replica (also held by at least one replica, WAIT; slower, and no rollback of an answered chunk)"})
    state_ack_timeout_ms: int = field(default=1000, metadata={"help": "with --state-ack replica: how long a chunk waits for a replica to hold it before it is answered 503 (its chunk_index retry then gets the stored answer)"})
    state_failover_s: float = field(default=10.0, metadata={"help": "how long a store operation is retried through a failover (connection lost, READONLY, no primary yet) before the chunk is answered 503 with Retry-After"})
    api_key: str | None = field(default=None, metadata={"help": "require this key (X-API-Key or Authorization: Bearer; gRPC metadata x-api-key or authorization) on every front door but health and metrics"})
    api_keys_file: str | None = field(default=None, metadata={"help": "keys per client: a file of 'NAME sha256:HEX' lines (python -m server.api_keys NAME makes one), re-read when it changes; session limits per client then count per key"})
    tls_cert: str | None = field(default=None, metadata={"help": "PEM certificate chain: HTTP (and WebSocket) and gRPC speak TLS 1.2/1.3 only; re-read when the file changes"})
    tls_key: str | None = field(default=None, metadata={"help": "PEM private key of --tls-cert"})
    tls_client_ca: str | None = field(default=None, metadata={"help": "mutual TLS: PEM CA certificate(s); a client without a certificate signed by one is refused at the handshake"})
    tls_client_cert_is_key: bool = field(default=False, metadata={"help": "with --tls-client-ca: a verified client certificate is enough, no API key needed (the client is named by its certificate's common name)"})
    cors_origins: str = field(default="", metadata={"help": "comma-separated origins allowed to call from a browser ('*' for any); empty: no cross-origin use"})
    health_detail: bool = field(default=False, metadata={"help": "show absolute file paths in /api/health"})
    stream_hop_s: float = field(default=0.5, metadata={"help": "WebSocket and gRPC streams: run the model once this much new audio has arrived (a WebSocket start message's 'hop' overrides); lower is less latency and more compute"})
    stream_max_buffer_s: float = field(default=10.0, metadata={"help": "WebSocket and gRPC streams: audio a stream may have waiting for the model; beyond it a WebSocket stream is told and closed, a gRPC stream is read no further until the model catches up"})
    grpc_port: int = field(default=52000, metadata={"help": "port of the Audio2Face-3D gRPC API (its clients' default, 52000); 0 turns it off"})
    grpc_frames_per_message: int = field(default=1, metadata={"help": "Audio2Face-3D gRPC: frames per animation_data message; 1 as Audio2Face-3D sends them (its clients count messages as frames); more for clients that read every frame of a message, at less server CPU per stream"})
    # Where each setting came from (flag, env, file, default-config); not a setting itself.
    sources: dict = field(default_factory=dict, compare=False, repr=False, metadata={"internal": True})
    cpu_threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's default)"})
    io_workers: int = field(default=4, metadata={"help": "threads for decoding, post-processing and serialisation"})

    def validate(self) -> "Settings":
        if self.log_level.lower() not in LOG_LEVELS:
            raise ConfigError(f"log level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        if self.context_mode not in ("continuous", "reference"):
            raise ConfigError(f"context_mode must be 'continuous' or 'reference', got {self.context_mode!r}")
        if self.model not in ("auto", "lam", "a2e-lite", "stub"):
            raise ConfigError(f"model must be auto, lam, a2e-lite or stub, got {self.model!r}")
        if self.loudness not in ("off", "gates", "normalize"):
            raise ConfigError(f"loudness must be off, gates or normalize, got {self.loudness!r}")
        if self.dtype not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"dtype must be fp32, bf16 or fp16, got {self.dtype!r}")
        if self.workers != "auto" and (not self.workers.isdigit()):
            raise ConfigError(f"workers must be auto or a number (0: one process), got {self.workers!r}")
        for name in ("max_sessions", "max_batch", "max_queue", "io_workers", "separation_queue", "max_connections", "max_sessions_per_client", "max_concurrent_clips", "grpc_frames_per_message"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        for name in ("session_idle_timeout_s", "max_upload_mb", "max_audio_s", "max_chunk_s", "single_pass_max_s", "separation_max_s",
                     "response_timeout_s", "max_queue_wait_s", "header_timeout_s", "body_idle_timeout_s", "body_min_rate_kb",
                     "keep_alive_timeout_s", "upload_memory_mb", "graceful_shutdown_s", "stream_hop_s", "stream_max_buffer_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        if self.stream_hop_s * 2 > self.stream_max_buffer_s:
            # A stream must be able to hold a hop waiting plus the next one arriving.
            raise ConfigError("stream_max_buffer_s must be at least twice stream_hop_s")
        if self.state != "memory":
            store_address.parse(self.state)
        if self.state_ack not in ("primary", "replica"):
            raise ConfigError(f"state_ack must be primary or replica, got {self.state_ack!r}")
        if self.state_ack_timeout_ms < 1 or self.state_failover_s <= 0:
            raise ConfigError("state_ack_timeout_ms and state_failover_s must be positive")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("TLS needs both --tls-cert and --tls-key")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        if self.tls_client_cert_is_key and self.tls_client_ca is None:
            raise ConfigError("--tls-client-cert-is-key needs --tls-client-ca (which clients' certificates to trust)")
        if not 0 <= self.grpc_port <= 65535:
            raise ConfigError(f"grpc_port must be 0 (off) or a port number, got {self.grpc_port}")
        return self

    @property
    def worker_count(self) -> int:
        """HTTP worker processes. Without CUDA one process serves best (on a small
        CPU machine the engine's model compute and the HTTP work share the same
        cores, and crossing processes costs more than it frees; see
        benchmarks/RESULTS.md); a GPU outruns one Python process several times
        over, so with CUDA the HTTP work spreads over the cores, keeping two for
        the engine and the system."""
        if self.workers != "auto":
            return int(self.workers)
        import torch

        wants_cuda = self.device.startswith("cuda") or any(d.startswith("cuda") for d in self.device_list)
        if not (wants_cuda or (self.device == "auto" and torch.cuda.is_available())):
            return 0
        return max(1, min(8, (os.cpu_count() or 2) - 2))

    @property
    def shared_state(self) -> bool:
        """Sessions live in a shared store (Redis), not in their engine."""
        return self.state != "memory"

    @property
    def device_list(self) -> list[str]:
        """The engines' devices (with --workers)."""
        if self.devices.strip() in ("", "auto"):
            return [self.device]
        return [d.strip() for d in self.devices.split(",") if d.strip()]

    @property
    def weight_is_explicit(self) -> bool:
        """A weights path the user gave (flag, environment, own config file, or in code):
        if it is missing, that is a mistake to report, not a reason to fall back."""
        return self.weight is not None and self.sources.get("weight") != "default-config"

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def cors_origin_list(self) -> tuple[str, ...]:
        return tuple(o.strip().rstrip("/") for o in self.cors_origins.split(",") if o.strip())

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    def resolve(self, path: str | None) -> Path | None:
        """A path from the settings, relative paths against the working directory, then the project."""
        if not path:
            return None
        p = Path(path)
        if p.is_absolute() or p.exists():
            return p
        return ROOT / p


_TYPES = {name: kind for name, kind in get_type_hints(Settings).items() if name != "sources"}
_SETTINGS = [f for f in fields(Settings) if not f.metadata.get("internal")]
_OPTIONAL = {f.name for f in _SETTINGS if f.default is None}


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"not a boolean: {text!r}")


def _coerce(name: str, value: Any) -> Any:
    kind = _TYPES[name]
    if value is None:
        return None
    if value == "" and name in _OPTIONAL:
        return None  # A2E_WEIGHT= (an empty variable, e.g. an image's unset build argument) means not set
    try:
        if kind is bool:
            return value if isinstance(value, bool) else _parse_bool(str(value))
        if kind is int:
            return int(value)
        if kind is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError, ConfigError) as exc:
        raise ConfigError(f"setting {name}: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="LAM-A2E inference server (audio -> 52 ARKit blendshapes at 30 fps)")
    for f in _SETTINGS:
        flag = "--" + f.name.replace("_", "-")
        if _TYPES[f.name] is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=f.metadata["help"])
        else:
            parser.add_argument(flag, dest=f.name, default=None, help=f"{f.metadata['help']} (default: {f.default})")
    return parser


def load_settings(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Defaults <- config file <- environment <- flags."""
    environ = os.environ if environ is None else environ
    flags = {k: v for k, v in vars(build_parser().parse_args(argv)).items() if v is not None}
    env = {f.name: environ[f"A2E_{f.name.upper()}"] for f in _SETTINGS if f"A2E_{f.name.upper()}" in environ}
    config_file = flags.get("config_file") or env.get("config_file") or DEFAULT_CONFIG
    settings = Settings(config_file=config_file)
    path = settings.resolve(config_file)
    file_values: dict[str, Any] = {}
    if path is not None and path.exists():
        # In an upstream config ``model`` describes the network (model_dims reads it), not --model.
        file_values = {k: v for k, v in read_config(path).items() if k in _TYPES and k not in ("config_file", "model")}
    elif config_file != DEFAULT_CONFIG:
        raise ConfigError(f"config file {config_file} does not exist")
    file_source = "default-config" if config_file == DEFAULT_CONFIG else "file"
    for source, values in ((file_source, file_values), ("env", env), ("flag", flags)):
        for name, value in values.items():
            setattr(settings, name, _coerce(name, value))
            settings.sources[name] = source
    return settings.validate()
