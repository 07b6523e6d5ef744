"""NVIDIA DALI loaders: GPU ``mixed`` JPEG decoding with a CPU twin, behind the ``Loader`` protocol.

Design (the reasons, measured or read in DALI 2.4's source, are in docs/data.md):

- **Order.** The file reader's own ``shuffle_after_epoch`` seeds its shuffle with a hard-coded
  constant + epoch (``kDaliDataloaderSeed``, file_label_loader.h), so it cannot follow the run
  seed, and its shards differ in size by one, which gives ranks different step counts. Each rank
  therefore takes its epoch's files from :mod:`spnet_dist.data.sampling`, the order the torchvision
  backend uses too (``DistributedSampler(seed, drop_last=True)``, sharded by the GLOBAL rank, cut
  to whole batches), and hands them to ``fn.readers.file(files=..., labels=...)``: every rank
  yields exactly ``len(loader)`` full batches per epoch, and both backends see the same samples
  in the same order on the same rank.
- **Segments.** One DALI pipeline reads one *segment*: the batches of an epoch from a start
  batch to the end. A segment starts at epoch 0 batch 0, at each new epoch, after a resume with a
  different world size, and after a corrupt file was skipped. Its random seed is a hash of
  ``(seed, rank, epoch, start batch)``, so a segment is fully defined by those four numbers plus
  the skipped files: that is what ``state_dict`` stores, together with the running pipeline's own
  checkpoint (``enable_checkpointing=True``), which carries the reader position and every RNG.
- **No wasted decoding.** Batches are scheduled by hand (``schedule_run``/``outputs``) and never
  past the segment's end, so the prefetch queue does not decode the next epoch's files twice.
"""
from __future__ import annotations

import base64
import math
import weakref
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import Tensor

from .protocol import CorruptImageError
from .sampling import (ShardedEvalLoader, ShardedTrainLoader, check_on_corrupt, corrupt_image_error, note_skipped,
                       segment_seed)
from .transforms import CIFAR_MEAN, CIFAR_STD, HALF, IMAGENET_MEAN, IMAGENET_STD

DALI_DEVICES = ("auto", "gpu", "cpu")


def dali_available() -> bool:
    """True if ``nvidia.dali`` imports (it is an install requirement, but may be absent)."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_dali_device(dali_device: str, device: Optional[torch.device]) -> str:
    """``data.dali_device`` -> ``"gpu"`` or ``"cpu"``.

    Args:
        dali_device: ``"auto"`` (gpu when this rank computes on CUDA), ``"gpu"`` or ``"cpu"``.
        device: the rank's compute device (``DistInfo.device``); None means CPU.

    Raises:
        ValueError: naming ``data.dali_device`` for an unknown value or ``gpu`` without CUDA.
    """
    if dali_device not in DALI_DEVICES:
        raise ValueError(f"data.dali_device must be one of {list(DALI_DEVICES)}, got {dali_device!r}")
    on_cuda = device is not None and device.type == "cuda"
    if dali_device == "auto":
        return "gpu" if on_cuda else "cpu"
    if dali_device == "gpu" and not on_cuda:
        raise ValueError("data.dali_device: 'gpu' needs a CUDA device on this rank; use 'cpu' or 'auto'")
    return dali_device


# ----------------------------------------------------------------------------- pipelines

@dataclass(frozen=True)
class DaliRecipe:
    """The augmentation recipe of :mod:`spnet_dist.data.transforms`, expressed for DALI.

    Attributes:
        augment: ``imagenet``, ``digits``, ``cifar`` or ``none`` (same names, same semantics).
        image_size: side of the square output.
        train: random augmentation (True) or the deterministic evaluation geometry.
    """

    augment: str
    image_size: int
    train: bool

    @property
    def mean_std(self) -> tuple[Sequence[float], Sequence[float]]:
        return {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "cifar": (CIFAR_MEAN, CIFAR_STD)}.get(
            self.augment, (HALF, HALF))


def _augment_graph(jpegs, recipe: DaliRecipe, decode_device: str, channels_last: bool, gpu: bool):
    """Decode + geometry + flip + normalise, mirroring ``build_transform`` (torchvision v1)."""
    from nvidia.dali import fn, types

    size = recipe.image_size
    mean, std = recipe.mean_std
    # The GPU decoder's documented knobs: share of images sent to the hardware JPEG decoder
    # (A100/H100 nvJPEG engine), and ImageNet-sized scratch buffers so it never reallocates.
    gpu_args = dict(hw_decoder_load=0.65, device_memory_padding=211025920,
                    host_memory_padding=140544512) if decode_device == "mixed" else {}
    mirror = 0
    if recipe.augment == "imagenet" and recipe.train:
        # Fused decode + RandomResizedCrop window: only the window's MCUs are decoded.
        images = fn.decoders.image_random_crop(
            jpegs, device=decode_device, output_type=types.RGB, random_area=[0.08, 1.0],
            random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10, **gpu_args)
        images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR,
                           antialias=True)
        mirror = fn.random.coin_flip(probability=0.5)
    else:
        images = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB, **gpu_args)
        if recipe.augment == "imagenet":  # eval: shorter side to size/0.875, centre crop
            # subpixel_scale=False: scale each axis by output/input size, as PIL does.
            images = fn.resize(images, resize_shorter=int(size / 0.875), subpixel_scale=False,
                               interp_type=types.INTERP_LINEAR, antialias=True)
            images = _centre_crop(images, size)
        else:
            images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR,
                               antialias=True)
            if recipe.train and recipe.augment == "digits":
                # RandomAffine(degrees=10, translate=(0.1, 0.1), fill=0): rotation about the
                # centre, then a whole-pixel shift of up to 10 % of the side.
                shift = fn.cast(fn.random.uniform(range=[-0.1 * size, 0.1 * size], shape=[2]),
                                dtype=types.INT32)
                matrix = fn.transforms.rotation(angle=fn.random.uniform(range=[-10.0, 10.0]),
                                                center=[size / 2, size / 2])
                matrix = fn.transforms.translation(matrix, offset=fn.cast(shift, dtype=types.FLOAT))
                images = fn.warp_affine(images, matrix=matrix, fill_value=0, inverse_map=False,
                                        interp_type=types.INTERP_NN)
            elif recipe.train and recipe.augment == "cifar":
                # RandomCrop(size, padding=size // 8) + flip: a window shifted by up to `pad`
                # pixels, zero outside the image.
                pad = size // 8
                anchor = fn.cast(fn.random.uniform(range=[-pad, pad + 1], shape=[2]), dtype=types.INT32)
                images = fn.slice(images, fn.cast(anchor, dtype=types.FLOAT), [float(size), float(size)],
                                  axes=[0, 1], normalized_anchor=False, normalized_shape=False,
                                  out_of_bounds_policy="pad", fill_values=0)
                mirror = fn.random.coin_flip(probability=0.5)
    if gpu and decode_device == "cpu":
        images = images.gpu()
    # uint8 -> float32, normalised, on the pipeline's output device (the GPU for `mixed`).
    return fn.crop_mirror_normalize(
        images, dtype=types.FLOAT, output_layout="HWC" if channels_last else "CHW",
        mirror=mirror,
        mean=[m * 255 for m in mean], std=[s * 255 for s in std])


def _centre_crop(images, size: int):
    """torchvision's CenterCrop window: top = round((H - size) / 2), Python's round-half-to-even.

    DALI's own centre crop rounds x.5 up, one pixel off torchvision on every odd margin.
    """
    from nvidia.dali import fn, types

    shape = fn.cast(images.shape(), dtype=types.INT32)  # (H, W, C)
    anchors = []
    for axis in (0, 1):
        margin = shape[axis] - size
        half = margin // 2
        anchors.append(half + (margin % 2) * (half % 2))  # x.5 -> the even neighbour
    anchor = fn.cast(fn.stack(*anchors), dtype=types.FLOAT)
    return fn.slice(images, anchor, [float(size), float(size)], axes=[0, 1],
                    normalized_anchor=False, normalized_shape=False)


# Every pipeline build_pipeline made that is neither shut down nor collected: a pipeline holds
# its pinned host buffers (and on GPU its device buffers) until then, so tests count them.
_LIVE_PIPELINES: "weakref.WeakSet[Any]" = weakref.WeakSet()


def live_pipelines() -> int:
    """How many pipelines of this module are alive (built, not shut down, not collected)."""
    return len(_LIVE_PIPELINES)


@dataclass(frozen=True)
class ReaderOptions:
    """How ``fn.readers.file`` reads the encoded files (``data.dali_*``).

    Attributes:
        dont_use_mmap: plain reads instead of mapping the file. DALI's own docs: mapping "provides
            a small performance benefit when accessing a local file system, but most network file
            systems do not provide optimum performance". Read in DALI's source
            (``file_label_loader.cc``, ``local_file.cc``): a mapped file is handed on as the mapping,
            so its bytes come over the network when the decoder first touches them, in the decoding
            threads and outside the reader's prefetch; a plain read fetches the whole file in the
            reader's own thread. (``read_ahead`` only changes the mapped path: ``MAP_POPULATE`` /
            ``madvise``; with plain reads it does nothing, so it is not exposed.)
        prefetch_queue_depth: batches of encoded files the reader thread keeps ready ahead of the
            decoders (DALI's default 1).
    """

    dont_use_mmap: bool = True
    prefetch_queue_depth: int = 4


def build_pipeline(files: Sequence[str], labels: Sequence[int], batch_size: int, recipe: DaliRecipe,
                   seed: int, num_threads: int = 2, dali_device: str = "cpu",
                   device_id: Optional[int] = None, channels_last: bool = False,
                   checkpoint: Optional[bytes] = None, reader: ReaderOptions = ReaderOptions()):
    """One checkpointable DALI pipeline over ``files`` in the given order (no reader shuffle).

    Args:
        files: absolute image paths, in reading order.
        labels: class index of each file.
        batch_size: samples per batch; the last batch is padded with the last file
            (``pad_last_batch``) and the loader removes the padding.
        recipe: decoding + augmentation recipe.
        seed: the pipeline's random seed (crop windows, flips, affine draws).
        num_threads: CPU worker threads of the pipeline (``data.num_workers``).
        dali_device: ``"gpu"`` (``mixed`` decoding on ``device_id``, outputs on the GPU) or
            ``"cpu"`` (everything on the CPU; ``device_id=None`` so no CUDA is touched).
        device_id: the CUDA device index of this rank (its local GPU) for ``"gpu"``.
        channels_last: emit ``HWC`` (the loader turns it into a channels-last NCHW view).
        checkpoint: a ``pipe.checkpoint()`` of an identical pipeline to resume from.
        reader: how the file reader reads (:class:`ReaderOptions`).
    """
    from nvidia.dali import fn, pipeline_def

    gpu = dali_device == "gpu"

    @pipeline_def(batch_size=batch_size, num_threads=max(1, num_threads),
                  device_id=device_id if gpu else None, seed=seed % 2**31,
                  enable_checkpointing=True, checkpoint=checkpoint, prefetch_queue_depth=2)
    def pipe():
        jpegs, file_labels = fn.readers.file(files=list(files), labels=list(labels), name="reader",
                                             random_shuffle=False, pad_last_batch=True,
                                             dont_use_mmap=reader.dont_use_mmap,
                                             prefetch_queue_depth=reader.prefetch_queue_depth)
        images = _augment_graph(jpegs, recipe, "mixed" if gpu else "cpu", channels_last, gpu)
        return images, (file_labels.gpu() if gpu else file_labels)

    pipeline = pipe()
    pipeline.build()
    _LIVE_PIPELINES.add(pipeline)
    return pipeline


def find_undecodable(paths: Sequence[str]) -> list[str]:
    """The files among ``paths`` that DALI's CPU decoder rejects, probed one at a time.

    Only called after a pipeline failed: DALI's error text names the file for some failures
    ("Failed to decode sample #3 : /x.jpg") but not for others ("nvImageCodec failure: '#4'").
    """
    from nvidia.dali import fn, pipeline_def, types

    bad = []
    for path in dict.fromkeys(paths):
        @pipeline_def(batch_size=1, num_threads=1, device_id=None)
        def probe():
            jpegs, _ = fn.readers.file(files=[path])
            return fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)

        pipeline = probe()
        try:
            pipeline.build()
            pipeline.run()
        except RuntimeError:
            bad.append(path)
        finally:
            _shutdown(pipeline)
    return bad


def _shutdown(pipeline) -> None:
    """Stop a pipeline's threads now, not whenever the garbage collector gets to it.

    ``Pipeline._shutdown`` is what DALI's own ``__del__`` and atexit hook call. Lingering DALI
    threads make a later ``fork`` (a DataLoader worker, a launcher) inherit locks held by
    threads that do not exist in the child: measured here as a worker stuck on a futex.
    """
    pipeline._shutdown()
    _LIVE_PIPELINES.discard(pipeline)


class _Segment:
    """Batches of one pipeline, ``num_samples`` files long; never schedules past the end.

    Raises :class:`CorruptImageError` (paths of the failing batch) when a batch fails to decode.
    """

    def __init__(self, pipeline, files: Sequence[str], batch_size: int, num_batches_done: int,
                 device: torch.device, channels_last: bool) -> None:
        self.pipeline = pipeline
        self.files = files
        self.batch_size = batch_size
        self.num_batches = math.ceil(len(files) / batch_size)
        self.done = num_batches_done  # batches already consumed (> 0 after a checkpoint restore)
        self.scheduled = num_batches_done
        self.device = device
        self.channels_last = channels_last

    def __len__(self) -> int:
        return self.num_batches - self.done

    def next_batch(self) -> tuple[Tensor, Tensor]:
        if self.done >= self.num_batches:
            raise StopIteration
        pipe = self.pipeline
        try:
            if self.scheduled == self.done:
                # First call: DALI fills its prefetch queue (prefetch_queue_depth batches).
                pipe.schedule_run()
                self.scheduled += pipe.prefetch_queue_depth if isinstance(pipe.prefetch_queue_depth, int) else 1
            images, labels = pipe.outputs()
        except RuntimeError as err:
            first = self.done * self.batch_size
            raise CorruptImageError(str(err), self.files[first:first + self.batch_size]) from err
        if self.scheduled < self.num_batches:
            pipe.schedule_run()  # keep exactly the queue depth in flight, never past the end
            self.scheduled += 1
        n = min(self.batch_size, len(self.files) - self.done * self.batch_size)  # strip padding
        self.done += 1
        return _to_torch(images, self.device, self.channels_last)[:n], _to_torch(labels, self.device)[:n].long().view(-1)

    def checkpoint(self) -> bytes:
        return self.pipeline.checkpoint()

    def close(self) -> None:
        _shutdown(self.pipeline)


def _to_torch(tensor_list, device: torch.device, channels_last: bool = False) -> Tensor:
    """A DALI batch as a torch tensor on ``device``.

    CPU: zero-copy through DLPack. DALI's default executor (``exec_dynamic``, on in 2.x) gives
    every iteration fresh, reference-counted output buffers, so the tensor stays valid while
    later batches are produced (measured; the resume tests keep old batches and compare them
    bit for bit). GPU: a copy on the current torch stream with DALI's documented
    ``feed_ndarray``, so the model's stream orders after it without a host sync.
    """
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    dense = tensor_list.as_tensor()
    if device.type == "cpu":
        out = torch.from_dlpack(dense)
    else:
        out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=device)
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device))
    if channels_last and out.dim() == 4:
        out = out.permute(0, 3, 1, 2)  # (B, H, W, C) memory viewed as NCHW = channels_last
    return out


# ----------------------------------------------------------------------------- loaders

class _DaliReader:
    """What both DALI loaders of a rank read with: the samples, the pipeline factory, bad-file handling."""

    def __init__(self, samples: Sequence[tuple[str, int]], batch_size: int, rank: int, recipe: DaliRecipe,
                 num_threads: int, dali_device: str, device: Optional[torch.device], channels_last: bool,
                 on_corrupt: str, reader: ReaderOptions) -> None:
        check_on_corrupt(on_corrupt)
        self.reader = reader
        self.samples = samples
        self.batch_size = batch_size
        self.rank = rank
        self.recipe = recipe
        self.num_threads = num_threads
        self.dali_device = dali_device
        gpu = dali_device == "gpu"
        self.device = device if gpu else torch.device("cpu")
        self.device_id = (device.index or 0) if gpu else None
        self.channels_last = channels_last
        self.on_corrupt = on_corrupt

    def start(self, indices: Sequence[int], seed: int, done: int = 0,
              checkpoint: Optional[bytes] = None) -> _Segment:
        """A segment reading ``indices`` (``done`` batches already consumed, after a restore)."""
        files = [self.samples[i][0] for i in indices]
        labels = [self.samples[i][1] for i in indices]
        pipeline = build_pipeline(files, labels, self.batch_size, self.recipe, seed, self.num_threads,
                                  self.dali_device, self.device_id, self.channels_last, checkpoint, self.reader)
        return _Segment(pipeline, files, self.batch_size, done, self.device, self.channels_last)

    def handle_corrupt(self, err: CorruptImageError, skipped: list[str]) -> None:
        """Record the undecodable files of a failed batch in ``skipped``, or stop (``on_corrupt=error``)."""
        bad = find_undecodable(err.paths)
        if not set(bad) - set(skipped):  # not a (new) decoding problem: do not hide it or loop
            raise RuntimeError(f"DALI pipeline failed: {err}") from err
        if self.on_corrupt == "error":
            raise corrupt_image_error(bad) from err
        note_skipped(bad, skipped, self.rank)


class DaliTrainLoader(ShardedTrainLoader):
    """Training batches of one rank from a DALI pipeline; implements ``Loader``.

    Same order, shards and position semantics as the torchvision
    :class:`~spnet_dist.data.torchvision_loader.TrainLoader` (both are
    :class:`~spnet_dist.data.sampling.ShardedTrainLoader`): the same samples per rank and epoch.
    Every batch is full; all ranks yield ``len(self)`` batches per epoch.

    Args:
        samples: ``(absolute path, label)`` of every training image, in the dataset's order.
        micro_batch_size: samples per batch on this rank.
        rank: GLOBAL rank (shards must differ across nodes).
        world_size: data-parallel ranks.
        seed: run seed (order and augmentation).
        recipe: augmentation recipe (``train=True``).
        num_threads: DALI CPU threads.
        dali_device: ``"gpu"`` or ``"cpu"`` (resolved, see :func:`resolve_dali_device`).
        device: this rank's CUDA device for ``"gpu"`` (its index is DALI's ``device_id``).
        channels_last: batches in channels-last memory format.
        on_corrupt: ``"skip"`` (replace the file by a spare of this rank and count it) or ``"error"``.
        reader: how the file reader reads (``data.dali_dont_use_mmap``, ``data.dali_prefetch_queue_depth``).
    """

    def __init__(self, samples: Sequence[tuple[str, int]], micro_batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, recipe: Optional[DaliRecipe] = None,
                 num_threads: int = 2, dali_device: str = "cpu", device: Optional[torch.device] = None,
                 channels_last: bool = False, on_corrupt: str = "error",
                 reader: ReaderOptions = ReaderOptions()) -> None:
        self.samples = list(samples)
        super().__init__(len(self.samples), micro_batch_size, rank, world_size, seed)
        self._reader = _DaliReader(self.samples, self.batch_size, self.rank, recipe or DaliRecipe("imagenet", 224, True),
                                   num_threads, dali_device, device, channels_last, on_corrupt, reader)
        self._segment: Optional[_Segment] = None
        self._segment_start = 0  # batch of the epoch at which the running pipeline started
        # (segment start, pipeline checkpoint) of a segment release() closed mid-way: the next
        # __iter__ rebuilds it from there, as load_state_dict would.
        self._parked: Optional[tuple[int, bytes]] = None

    def _bad_indices(self) -> set[int]:
        skipped = set(self.skipped)
        return {i for i, (path, _) in enumerate(self.samples) if path in skipped} if skipped else set()

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        epoch = self.epoch
        while self.epoch == epoch and self.batches_seen < len(self):
            if self._segment is None and self._parked is not None:
                start, checkpoint = self._parked
                self._parked = None
                self._begin_segment(start, checkpoint, done=self.batches_seen - start)
            elif self._segment is None:
                self._begin_segment(self.batches_seen)
            try:
                batch = self._segment.next_batch()
            except CorruptImageError as err:
                self._drop_segment()  # then restart this epoch at this batch without the bad files
                self._reader.handle_corrupt(err, self.skipped)
                continue
            self.batches_seen += 1
            yield batch
        self.finish_epoch(epoch)

    def _begin_segment(self, start: int, checkpoint: Optional[bytes] = None, done: int = 0) -> None:
        indices = self.epoch_indices(self.epoch, self._bad_indices())[start * self.batch_size:]
        self._segment_start = start
        self._segment = self._reader.start(indices, segment_seed(self.seed, self.rank, self.epoch, start),
                                           done, checkpoint)

    def leave_epoch(self) -> None:
        self._drop_segment()

    def release(self) -> None:
        """Shut the running pipeline down now; the next ``__iter__`` continues bit for bit.

        A segment stopped mid-way is parked as its checkpoint (the bytes ``state_dict`` would
        save) and rebuilt from it; a segment read to its end needs nothing. Without this the
        training pipeline (on GPU: pinned host buffers, nvJPEG scratch, decoded batches) lived
        until the next ``set_epoch`` while the evaluation built a second one.
        """
        if self._segment is None:
            return
        if self.batches_seen > self._segment_start and self.batches_seen < len(self):
            self._parked = (self._segment_start, self._segment.checkpoint())
        self._segment.close()
        self._segment = None

    def _drop_segment(self) -> None:
        if self._segment is not None:
            self._segment.close()  # frees the pipeline (and its GPU memory) before a new one is built
        self._segment = None
        self._parked = None

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position: the torchvision keys + the pipeline checkpoint (base64)."""
        checkpoint, start = None, self.batches_seen
        if self._segment is not None and self.batches_seen > self._segment_start:
            checkpoint, start = self._segment.checkpoint(), self._segment_start
        elif self._segment is None and self._parked is not None:
            start, checkpoint = self._parked
        return {
            **super().state_dict(),
            "backend": "dali",
            "segment_start": start,
            "pipeline": base64.b64encode(checkpoint).decode("ascii") if checkpoint is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position; the next ``__iter__`` continues exactly where it stopped.

        Same geometry (world size, micro-batch, data set size): the pipeline is rebuilt as it was
        and restored from its checkpoint, so images (crop windows, flips) and labels continue
        bit for bit. Otherwise (e.g. a requeue onto fewer nodes, or a state saved by the
        torchvision backend) the position is converted as
        :meth:`~spnet_dist.data.sampling.ShardedTrainLoader.restore_position` says.
        """
        self._drop_segment()
        same = self.restore_position(state)
        if same and state.get("pipeline"):
            start = int(state["segment_start"])
            self._begin_segment(start, base64.b64decode(state["pipeline"]), done=self.batches_seen - start)


class DaliEvalLoader(ShardedEvalLoader):
    """This rank's strided, unpadded share of an evaluation set (``range(rank, N, world)``).

    The same images per rank as the torchvision
    :class:`~spnet_dist.data.torchvision_loader.EvalLoader` (both are
    :class:`~spnet_dist.data.sampling.ShardedEvalLoader`); the last batch may be smaller (DALI
    pads it with the last file; the padding is removed here). With ``on_corrupt=skip`` an
    undecodable image is left out and counted in ``skipped``.

    Args: see :class:`DaliTrainLoader` (``recipe.train`` is False).
    """

    def __init__(self, samples: Sequence[tuple[str, int]], batch_size: int, rank: int = 0, world_size: int = 1,
                 recipe: Optional[DaliRecipe] = None, num_threads: int = 2, dali_device: str = "cpu",
                 device: Optional[torch.device] = None, channels_last: bool = False,
                 on_corrupt: str = "error", reader: ReaderOptions = ReaderOptions()) -> None:
        self.samples = list(samples)
        super().__init__(len(self.samples), batch_size, rank, world_size)
        self._reader = _DaliReader(self.samples, self.batch_size, self.rank, recipe or DaliRecipe("imagenet", 224, False),
                                   num_threads, dali_device, device, channels_last, on_corrupt, reader)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        position = 0  # samples of this rank's share already yielded (skipped ones excluded)
        while True:
            bad = set(self.skipped)
            todo = [i for i in self.indices if self.samples[i][0] not in bad][position:]
            if not todo:
                return
            segment = self._reader.start(todo, seed=0)
            try:
                while True:
                    try:
                        images, labels = segment.next_batch()
                    except StopIteration:
                        return
                    position += len(labels)
                    yield images, labels
            except CorruptImageError as err:
                self._reader.handle_corrupt(err, self.skipped)  # then rebuild from `position` without the bad files
            finally:
                segment.close()
