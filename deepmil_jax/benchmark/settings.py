"""What to measure and how long (``Settings``), and what that comes to on this machine
(``Setup``: the device-dependent batch and precision, the training configuration, the mesh).
JAX is imported only by ``resolve``, so that the program answers ``--help`` before it loads."""

from __future__ import annotations

import dataclasses
import os
import platform
from typing import TYPE_CHECKING, Any

import numpy as np

from deepmil_jax.config import Config
from deepmil_jax.errors import ConfigError

if TYPE_CHECKING:
    import jax

PARTS = ("train", "eval", "pipeline", "overlap", "preprocess", "torch")
INBREAST_SHAPE = (4084, 3328)  # rows x columns of an INbreast mammogram (3328 x 4084 pixels)


@dataclasses.dataclass(frozen=True)
class Settings:
    scheme: str = "label_assign"
    backbone: str = "caffe"
    batch_size: int | None = None  # None: 32 on CPU, 256 on accelerators
    image_size: int = 227
    k: float = 6
    precision: str | None = None  # None: fp32 on CPU, bf16 on accelerators
    repeats: int = 10
    steps_per_repeat: int = 1
    warmup: int = 2
    pipeline_images: int = 256  # images held in memory by the pipeline benchmark
    pipeline_batches: int = 8  # batches per timed pipeline repeat
    preprocess_images: int = 40
    preprocess_workers: int | None = None  # None: the CPU count
    preprocess_distinct: int = 4
    preprocess_shape: tuple[int, int] = INBREAST_SHAPE
    head_hidden: tuple[int, ...] = ()
    torch: bool = True
    torch_channels_last: bool = True
    seed: int = 0

    @staticmethod
    def quick() -> Settings:
        """Tiny sizes and few repeats: 131x131 images (a 3x3 grid), batch 4, small DICOMs."""
        return Settings(
            batch_size=4,
            image_size=131,
            k=2,
            repeats=2,
            steps_per_repeat=1,
            warmup=1,
            pipeline_images=16,
            pipeline_batches=2,
            preprocess_images=4,
            preprocess_distinct=2,
            preprocess_shape=(1024, 832),
        )


@dataclasses.dataclass(frozen=True)
class Setup:
    """The settings resolved on this machine, and the fixed batch every step timer uses."""

    settings: Settings
    config: Config  # validated, in canonical form
    mesh: jax.sharding.Mesh
    device: Any  # the first jax.Device
    images: np.ndarray  # (batch, size, size, 1) float32 on [0, 1)
    labels: np.ndarray  # (batch,) int32, alternating 0 and 1

    @property
    def on_accelerator(self) -> bool:
        return self.device.platform != "cpu"

    @property
    def batch(self) -> int:
        return self.config.batch_size

    @property
    def precision(self) -> str:
        return self.config.precision


def resolve(settings: Settings, base_config: Config | None = None) -> Setup:
    """The training configuration the benchmark measures (``base_config``'s remaining fields,
    default ``Config()``), validated before any work; the batch must split over the mesh."""
    import jax

    from deepmil_jax import train

    device = jax.devices()[0]
    on_accelerator = device.platform != "cpu"
    batch = (
        settings.batch_size if settings.batch_size is not None else (256 if on_accelerator else 32)
    )
    config = dataclasses.replace(
        base_config or Config(),
        scheme=settings.scheme,
        backbone=settings.backbone,
        batch_size=batch,
        eval_batch_size=batch,
        image_size=settings.image_size,
        k=settings.k,
        precision=settings.precision or ("bf16" if on_accelerator else "fp32"),
        head_hidden=settings.head_hidden,
        seed=settings.seed,
        init="random",
    )
    config.validate()
    config = config.canonical()
    mesh = train.make_mesh()
    if batch % mesh.devices.size:
        raise ConfigError(
            f"--batch_size={batch} cannot be split over {mesh.devices.size} devices; use a "
            f"multiple of {mesh.devices.size}."
        )
    rng = np.random.default_rng(settings.seed)
    images = rng.random((batch, settings.image_size, settings.image_size, 1), dtype=np.float32)
    labels = (np.arange(batch) % 2).astype(np.int32)
    return Setup(settings, config, mesh, device, images, labels)


def describe(setup: Setup) -> dict[str, Any]:
    """The head of the JSON object: what was measured, where, and the load at the start."""
    import jax

    return {
        "backbone": setup.config.backbone,
        "scheme": setup.config.scheme,
        "k": setup.config.k,
        "batch_size": setup.batch,
        "device": f"{setup.mesh.devices.size} x {setup.device.device_kind} "
        f"({setup.device.platform})",
        "precision": setup.precision,
        "image_size": setup.config.image_size,
        "load_average_start": os.getloadavg()[0],
        "cpu_count": len(os.sched_getaffinity(0)),
        "jax_version": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "python": platform.python_version(),
    }
