"""Ingest throughput: FrameSender -> FrameListener -> consumer, against bare pyzmq PUSH/PULL.

Sends ``--frames`` frames of ``--shape`` uint16 (default 2048x2048, 8 MiB) over ``tcp://127.0.0.1`` and
``ipc://`` and reports frames/s, GB/s and the ratio to a bare pyzmq PUSH/PULL of the same buffers in the
same run. One child process, like a microscope script, sends every round of both arms from the same
buffers; ``copy=False`` on both sides; time is measured from the first to the last frame received. Also
reports the CPU time per frame of the receiving thread (where our code runs; a plain blocking ``recv``
loop in the bare arm), the receiving process's page faults per frame and its resident memory before and
after, to show it stays flat.

Both arms use the same ZeroMQ high-water marks (``--sndhwm``/``--rcvhwm``, default: ours, 32 and 4), so
the ratio is the cost of our code, not of a queue depth; ``--sndhwm 1000 --rcvhwm 1000`` runs both at
pyzmq's defaults. Both arms run in this process, so they share its ``malloc`` settings: the listener's
``retain_buffers`` (default on) applies to the bare arm too; ``--no-retain-buffers`` measures both with
glibc's defaults.

``--curve`` pairs the listener with ZeroMQ CURVE (encrypted, clients authenticated against an allowlist,
as ``cellsam-stream serve --curve-secret-key``) against the same listener without it, in one run: the cost
of authentication and encryption on the ingest path.

    python benchmarks/bench_ingest.py
    python benchmarks/bench_ingest.py --curve --transports tcp     # CURVE / plain
    python benchmarks/bench_ingest.py --frames 10000 --rounds 1 --transports tcp   # memory over 10,000
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from acquisition.client import FrameSender
from acquisition.frames import Frame
from acquisition.listener import FrameListener
from acquisition.security import ClientKeys, CurveServer, create_key_pair


def rss_mib() -> float:
    """Resident set size of this process in MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def minor_faults() -> int:
    """Minor page faults of this process so far (all threads, ZeroMQ's I/O thread included)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _frames(shape: tuple[int, int]) -> list[np.ndarray]:
    # A few distinct buffers, reused: the sender must not allocate per frame either.
    rng = np.random.default_rng(0)
    return [rng.integers(0, 4096, shape, dtype=np.uint16) for _ in range(4)]


def _send(
    kind: str,
    endpoint: str,
    frames: list[np.ndarray],
    n: int,
    sndhwm: int,
    curve_files: tuple[str, str] | None = None,
) -> None:
    """Send ``n`` of ``frames`` (cycling) to ``endpoint``: bare pyzmq, or ``FrameSender`` (with CURVE
    when ``curve_files``, the client's secret and the server's public key file, are given)."""
    if kind == "bare":
        ctx = zmq.Context()
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.SNDHWM, sndhwm)
        push.connect(endpoint)
        header = json.dumps({"type": "frame", "v": 1}).encode()
        for i in range(n):
            push.send_multipart([header, frames[i % len(frames)].data], copy=False)
        push.close(linger=-1)
        ctx.term()  # returns once every zero-copy frame has left
    else:
        curve = ClientKeys.from_files(*curve_files) if curve_files else None
        with FrameSender(
            endpoint=endpoint, acquisition="bench", timeout=None, sndhwm=sndhwm, curve=curve
        ) as tx:
            for i in range(n):
                tx.send(frames[i % len(frames)], t=i)


def _sender_main(conn: Any, shape: tuple[int, int]) -> None:
    frames = _frames(shape)
    while (job := conn.recv()) is not None:
        try:
            _send(job[0], job[1], frames, job[2], job[3], job[4])
        except Exception as exc:  # reported to the parent, which fails the run
            conn.send(repr(exc))
        else:
            conn.send(None)


class Sender:
    """A child process, like a microscope script, that sends frames when asked.

    One process for the whole run: every round of both arms sends the very same buffers from the same
    memory, so page placement (huge pages or not) does not differ from round to round.
    """

    def __init__(self, shape: tuple[int, int]) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._proc = context.Process(target=_sender_main, args=(child, shape), daemon=True)
        self._proc.start()

    def start(
        self, kind: str, endpoint: str, n: int, sndhwm: int, curve_files: tuple[str, str] | None = None
    ) -> None:
        """Begin sending ``n`` frames to ``endpoint`` (``kind``: ``bare`` or ``ours``)."""
        self._conn.send((kind, endpoint, n, sndhwm, curve_files))

    def wait(self, timeout: float = 120.0) -> None:
        """Wait until the last frame has left; raise if sending failed."""
        if not self._conn.poll(timeout):
            raise TimeoutError(f"sender did not finish within {timeout} s")
        error = self._conn.recv()
        if error is not None:
            raise RuntimeError(f"sender failed: {error}")

    def close(self) -> None:
        self._conn.send(None)
        self._proc.join(30)


def bare_pyzmq(sender: Sender, endpoint: str, n: int, hwm: tuple[int, int] = (32, 4)) -> float:
    """Seconds between the first and the last of ``n`` frames through a plain PUSH/PULL (zero-copy).

    ``hwm`` is (send, receive) high-water marks.
    """
    pull: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, hwm[1])
    pull.bind(endpoint)
    sender.start("bare", pull.getsockopt_string(zmq.LAST_ENDPOINT), n, hwm[0])
    pull.setsockopt(zmq.RCVTIMEO, 30_000)  # a crashed sender fails the run instead of hanging it
    pull.recv_multipart(copy=False)
    start = time.perf_counter()
    for _ in range(n - 1):
        pull.recv_multipart(copy=False)
    elapsed = time.perf_counter() - start
    sender.wait()
    pull.close(linger=0)
    return elapsed


def ours(
    sender: Sender,
    endpoint: str,
    n: int,
    hwm: tuple[int, int] = (32, 4),
    retain_buffers: bool = True,
    curve: Curve | None = None,
) -> float:
    """Seconds between the first and the last of ``n`` frames FrameSender -> FrameListener -> consumer
    (both ends with CURVE when ``curve`` is given)."""

    async def main() -> float:
        async with FrameListener(
            endpoint=endpoint,
            max_queued=8,
            max_frame_bytes=1 << 30,
            rcvhwm=hwm[1],
            retain_buffers=retain_buffers,
            **(curve.server.socket_kwargs("ingest") if curve else {}),
        ) as listener:
            sender.start("ours", listener.endpoint, n, hwm[0], curve.client_files if curve else None)

            async def first() -> None:
                while type(await listener.get()) is not Frame:
                    pass

            await asyncio.wait_for(first(), 30)

            async def drain() -> None:
                # The listener returns notices (start, end, rejections) among the frames: a consumer
                # skips them here (the sender sends none, so the loop costs one type check per frame).
                received = 1
                while received < n:
                    event = await listener.get()
                    if type(event) is Frame:
                        event.id  # noqa: B018 -- a consumer reads at least where the frame belongs
                        received += 1

            start = time.perf_counter()
            # One timeout around the loop, not one per frame: wait_for wraps each call in a task, which
            # would measure asyncio's task overhead rather than the listener.
            await asyncio.wait_for(drain(), 30 + n * 0.1)
            elapsed = time.perf_counter() - start
            await asyncio.to_thread(sender.wait)
            return elapsed

    return asyncio.run(main())


class Curve:
    """A CURVE server (started) and the files of its one allowed client, made in ``directory``."""

    def __init__(self, directory: Path) -> None:
        _, server_secret = create_key_pair(directory / "server", "server")
        client_public, client_secret = create_key_pair(directory / "client", "client")
        self.server = CurveServer(secret_key_file=server_secret, allowed_clients=client_public)
        self.server.start()
        self.client_files = (str(client_secret), str(directory / "server" / "server.key"))

    def close(self) -> None:
        self.server.close()


def asyncio_floor(sender: Sender, endpoint: str, n: int, hwm: tuple[int, int] = (32, 4)) -> float:
    """Seconds for ``n`` frames FrameSender -> the least an asyncio receiver does -> consumer.

    The listener's structure with nothing else: a reader callback on ZeroMQ's descriptor receives until
    ZeroMQ is empty, queues the raw parts (at most 8) and wakes the consumer waiting on a future. No
    validation, no ``Frame``, no bookkeeping: what any event-loop receiver pays on this machine.
    """
    pull: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, hwm[1])
    pull.bind(endpoint)
    fd = int(pull.getsockopt(zmq.FD))
    queue: collections.deque[list[Any]] = collections.deque()
    waiting: list[asyncio.Future[None]] = []

    async def main() -> float:
        loop = asyncio.get_running_loop()
        reading = False

        def on_readable() -> None:
            nonlocal reading
            while len(queue) < 8:
                if not int(pull.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                    return
                queue.append(pull.recv_multipart(zmq.NOBLOCK, copy=False))
                if waiting:
                    waiting.pop().set_result(None)
            loop.remove_reader(fd)
            reading = False

        async def get() -> list[Any]:
            nonlocal reading
            while not queue:
                waiter = loop.create_future()
                waiting.append(waiter)
                await waiter
            parts = queue.popleft()
            if not reading:
                loop.add_reader(fd, on_readable)
                reading = True
                loop.call_soon(on_readable)
            return parts

        loop.add_reader(fd, on_readable)
        reading = True
        sender.start("ours", pull.getsockopt_string(zmq.LAST_ENDPOINT), n, hwm[0])
        await asyncio.wait_for(get(), 30)

        async def drain() -> None:
            for _ in range(n - 1):
                await get()

        start = time.perf_counter()
        await asyncio.wait_for(drain(), 30 + n * 0.1)
        elapsed = time.perf_counter() - start
        if reading:
            loop.remove_reader(fd)
        await asyncio.to_thread(sender.wait)
        return elapsed

    try:
        return asyncio.run(main())
    finally:
        pull.close(linger=0)


def paired_rounds(
    sender: Sender,
    endpoint: str,
    frames: int,
    rounds: int,
    hwm: tuple[int, int],
    retain_buffers: bool,
    arms: tuple[str, ...] = ("bare", "ours"),
    curve: Curve | None = None,
) -> tuple[dict[str, list[float]], dict[str, int], dict[str, list[float]]]:
    """Per arm: seconds per round; page faults over all rounds; the receiving thread's CPU seconds per
    round.

    This machine's throughput drifts by more than the gap between the arms over a run, so each round
    measures every arm back to back (the order rotating and alternating); compare them round by round.
    The receiving thread (this one: a blocking ``recv`` loop, or the event loop) is where our code runs;
    ZeroMQ's own I/O thread is the same in every arm.
    """
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    cpu: dict[str, list[float]] = {arm: [] for arm in arms}
    faults = dict.fromkeys(arms, 0)
    for i in range(rounds):
        order = arms[i % len(arms) :] + arms[: i % len(arms)]
        for arm in order if i % 2 == 0 else order[::-1]:
            before, cpu_before = minor_faults(), time.thread_time()
            if arm == "bare":
                times[arm].append(bare_pyzmq(sender, endpoint, frames, hwm))
            elif arm == "floor":
                times[arm].append(asyncio_floor(sender, endpoint, frames, hwm))
            elif arm == "curve":
                times[arm].append(ours(sender, endpoint, frames, hwm, retain_buffers, curve))
            else:
                times[arm].append(ours(sender, endpoint, frames, hwm, retain_buffers))
            cpu[arm].append(time.thread_time() - cpu_before)
            faults[arm] += minor_faults() - before
    return times, faults, cpu


def control_ratios(
    sender: Sender, endpoint: str, frames: int, rounds: int, hwm: tuple[int, int]
) -> np.ndarray:
    """Bare pyzmq against itself, paired the same way: the spread a ratio of 1 shows on this machine."""
    ratios = []
    for _ in range(rounds):
        first = bare_pyzmq(sender, endpoint, frames, hwm)
        ratios.append(first / bare_pyzmq(sender, endpoint, frames, hwm))
    return np.array(ratios)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=500, help="frames per round")
    parser.add_argument("--shape", type=int, nargs=2, default=(2048, 2048))
    parser.add_argument(
        "--rounds",
        type=int,
        default=10,
        help="pairs of back-to-back runs, one of each arm, their order alternating (median ratio reported)",
    )
    parser.add_argument("--transports", nargs="+", default=["tcp", "ipc"], choices=["tcp", "ipc"])
    parser.add_argument("--sndhwm", type=int, default=32, help="send high-water mark of both arms")
    parser.add_argument("--rcvhwm", type=int, default=4, help="receive high-water mark of both arms")
    parser.add_argument(
        "--control",
        action="store_true",
        help="also pair bare pyzmq with itself, to show how far from 1 noise alone moves the ratio",
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also pair the least an asyncio receiver does (no validation, no bookkeeping) with bare "
        "pyzmq: the share of the gap that is the event loop's, not the listener's",
    )
    parser.add_argument(
        "--curve",
        action="store_true",
        help="instead of bare pyzmq, pair the listener with CURVE against the listener without it",
    )
    parser.add_argument(
        "--no-retain-buffers",
        dest="retain_buffers",
        action="store_false",
        help="leave glibc's malloc thresholds alone (frame buffers are unmapped and faulted in per frame)",
    )
    args = parser.parse_args(argv)
    shape = (int(args.shape[0]), int(args.shape[1]))
    nbytes = shape[0] * shape[1] * 2
    report: dict[str, Any] = {
        "frame_bytes": nbytes,
        "frames": args.frames,
        "retain_buffers": args.retain_buffers,
        "sndhwm": args.sndhwm,
        "rcvhwm": args.rcvhwm,
    }
    sender = Sender(shape)
    with tempfile.TemporaryDirectory() as tmp:
        if args.curve:
            report.update(curve_vs_plain(sender, args, Path(tmp), nbytes))
            sender.close()
            return report
        for transport in args.transports:
            endpoint = "tcp://127.0.0.1:*" if transport == "tcp" else f"ipc://{tmp}/bench-{transport}"
            # Warm-up: imports, first allocations (and the listener's malloc settings, for both arms).
            hwm = (args.sndhwm, args.rcvhwm)
            ours(sender, endpoint, min(20, args.frames), hwm, args.retain_buffers)
            rss_before = rss_mib()
            arms = ("bare", "ours", "floor") if args.floor else ("bare", "ours")
            times, faults, cpu = paired_rounds(
                sender, endpoint, args.frames, args.rounds, hwm, args.retain_buffers, arms
            )
            bare_times, our_times = times["bare"], times["ours"]
            t_bare, t_ours = min(bare_times), min(our_times)
            paired = np.array(bare_times) / np.array(our_times)
            median_ratio = float(np.median(paired))
            rss_after = rss_mib()
            row = {
                "bare_fps": (args.frames - 1) / t_bare,
                "bare_GBps": (args.frames - 1) * nbytes / t_bare / 1e9,
                "ours_fps": (args.frames - 1) / t_ours,
                "ours_GBps": (args.frames - 1) * nbytes / t_ours / 1e9,
                "ratio": median_ratio,
                "ratio_of_bests": t_bare / t_ours,
                "ratio_range": [float(paired.min()), float(paired.max())],
                "bare_cpu_us_per_frame": float(np.median(cpu["bare"])) / args.frames * 1e6,
                "ours_cpu_us_per_frame": float(np.median(cpu["ours"])) / args.frames * 1e6,
                "bare_faults_per_frame": faults["bare"] / (args.rounds * args.frames),
                "ours_faults_per_frame": faults["ours"] / (args.rounds * args.frames),
                "rss_before_MiB": rss_before,
                "rss_after_MiB": rss_after,
            }
            report[transport] = row
            print(
                f"{transport}: bare {row['bare_fps']:.0f} frames/s ({row['bare_GBps']:.2f} GB/s), "
                f"ours {row['ours_fps']:.0f} frames/s ({row['ours_GBps']:.2f} GB/s), "
                f"ratio {median_ratio:.2f} (median of {args.rounds} paired rounds, "
                f"range {paired.min():.2f}-{paired.max():.2f}; of bests {t_bare / t_ours:.2f}), "
                f"receiving thread CPU/frame bare {row['bare_cpu_us_per_frame']:.0f} µs "
                f"ours {row['ours_cpu_us_per_frame']:.0f} µs, "
                f"page faults/frame bare {row['bare_faults_per_frame']:.0f} "
                f"ours {row['ours_faults_per_frame']:.0f}, "
                f"RSS {rss_before:.0f} -> {rss_after:.0f} MiB"
            )
            if args.floor:
                floor = np.array(bare_times) / np.array(times["floor"])
                row["floor_ratio"] = float(np.median(floor))
                row["floor_ratio_of_bests"] = t_bare / min(times["floor"])
                row["floor_cpu_us_per_frame"] = float(np.median(cpu["floor"])) / args.frames * 1e6
                print(
                    f"{transport} floor, least asyncio receiver / bare: ratio {np.median(floor):.2f} "
                    f"(median of {args.rounds}, range {floor.min():.2f}-{floor.max():.2f}; "
                    f"of bests {row['floor_ratio_of_bests']:.2f}), "
                    f"receiving thread CPU/frame {row['floor_cpu_us_per_frame']:.0f} µs"
                )
            if args.control:
                control = control_ratios(sender, endpoint, args.frames, args.rounds, hwm)
                row["control_ratio"] = float(np.median(control))
                row["control_range"] = [float(control.min()), float(control.max())]
                print(
                    f"{transport} control, bare vs bare: ratio {np.median(control):.2f} "
                    f"(median of {args.rounds} paired rounds, range {control.min():.2f}-{control.max():.2f})"
                )
    sender.close()
    return report


def curve_vs_plain(sender: Sender, args: argparse.Namespace, tmp: Path, nbytes: int) -> dict[str, Any]:
    """The listener with CURVE against the listener without it, paired round by round per transport."""
    report: dict[str, Any] = {"curve": True}
    curve = Curve(tmp / "keys")
    try:
        for transport in args.transports:
            endpoint = "tcp://127.0.0.1:*" if transport == "tcp" else f"ipc://{tmp}/bench-{transport}"
            hwm = (args.sndhwm, args.rcvhwm)
            ours(sender, endpoint, min(20, args.frames), hwm, args.retain_buffers, curve)  # warm-up
            times, _, cpu = paired_rounds(
                sender, endpoint, args.frames, args.rounds, hwm, args.retain_buffers, ("ours", "curve"), curve
            )
            paired = np.array(times["ours"]) / np.array(times["curve"])
            t_plain, t_curve = min(times["ours"]), min(times["curve"])
            row = {
                "plain_fps": (args.frames - 1) / t_plain,
                "plain_GBps": (args.frames - 1) * nbytes / t_plain / 1e9,
                "curve_fps": (args.frames - 1) / t_curve,
                "curve_GBps": (args.frames - 1) * nbytes / t_curve / 1e9,
                "ratio": float(np.median(paired)),
                "ratio_of_bests": t_plain / t_curve,
                "ratio_range": [float(paired.min()), float(paired.max())],
                "plain_cpu_us_per_frame": float(np.median(cpu["ours"])) / args.frames * 1e6,
                "curve_cpu_us_per_frame": float(np.median(cpu["curve"])) / args.frames * 1e6,
            }
            report[transport] = row
            print(
                f"{transport}: plain {row['plain_fps']:.0f} frames/s ({row['plain_GBps']:.2f} GB/s), "
                f"CURVE {row['curve_fps']:.0f} frames/s ({row['curve_GBps']:.2f} GB/s), "
                f"CURVE / plain {row['ratio']:.2f} (median of {args.rounds} paired rounds, range "
                f"{paired.min():.2f}-{paired.max():.2f}; of bests {row['ratio_of_bests']:.2f})"
            )
    finally:
        curve.close()
    return report


if __name__ == "__main__":
    main()
