"""Benchmark ggspeed.codec's Triton backend on a CUDA device: GB/s against a device copy.

    python tools/bench_codec_gpu.py                      # markdown table
    python tools/bench_codec_gpu.py --n 67108864 --out DIR   # also DIR/bench_codec_gpu.json

Data: generalized-Gaussian samples of shapes 0.5, 1, 2 quantized to ~4 bits/element of entropy
(plain mode, k="auto": the operating point of the GPU speed target), shape 1 at 2 and 8 bits,
and the zero-run mode at 0.5 bit. Throughput is GB/s of fp32-equivalent input (4 bytes per element): encode
(``eg_encode``, including its host sync for the stream's size), decode (``eg_decode``,
validate=False: the kernel, not the header checks) and ``eg_code_length``; beside them a
device-to-device copy (``clone``) of the fp32 input, timed in the same run. Medians of
``--repeats`` timed calls after a warm-up (which compiles the kernels). Every stream is decoded
and compared with its input once.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_codec import step_for_entropy  # tools/ is on sys.path when run as a script

from ggspeed import codec, gg

CASES = [  # (shape, target bits, mode)
    (0.5, 4.0, "auto"),
    (1.0, 4.0, "auto"),
    (2.0, 4.0, "auto"),
    (1.0, 2.0, "auto"),
    (1.0, 8.0, "auto"),
    (0.5, 0.5, "runs"),
    (1.0, 0.5, "runs"),
]


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of fn (synchronized) over repeats, after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def case(shape: float, target: float, mode: str, n: int, chunk: int, repeats: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(1234)
    x = gg.sample(shape, 1.0, n, generator=gen, dtype=torch.float32, device="cuda")
    q = codec.quantize(x, step_for_entropy(shape, target))
    runs = mode == "runs"
    s = codec.eg_encode(q, "auto", runs, chunk_size=chunk)
    assert torch.equal(codec.eg_decode(s), q.flatten().to(torch.int32)), "round trip failed"
    gb = 4 * n / 1e9
    t_copy = timed(lambda: x.clone(), repeats)
    t_enc = timed(lambda: codec.eg_encode(q, "auto", runs, chunk_size=chunk), repeats)
    t_dec = timed(lambda: codec.eg_decode(s, validate=False), repeats)
    t_len = timed(lambda: codec.eg_code_length(q, "auto", runs, chunk_size=chunk), repeats)
    return {
        "shape": shape,
        "target_bits": target,
        "mode": mode,
        "chunk": chunk,
        "bits_per_elem": s.nbits / n,
        "copy_GBps": gb / t_copy,
        "encode_GBps": gb / t_enc,
        "decode_GBps": gb / t_dec,
        "code_length_GBps": gb / t_len,
        "encode_ms": 1e3 * t_enc,
        "decode_ms": 1e3 * t_dec,
    }


def profile(n: int) -> None:
    """Where the GPU time goes (shape 1; plain auto at 4 bits, zero-run auto at 0.5 bit): the
    top kernels of one encode and one decode of each."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    gen = torch.Generator(device="cuda").manual_seed(1)
    x = gg.sample(1.0, 1.0, n, generator=gen, dtype=torch.float32, device="cuda")
    q = codec.quantize(x, step_for_entropy(1.0, 4.0))
    q_low = codec.quantize(x, step_for_entropy(1.0, 0.5))
    s = codec.eg_encode(q, "auto")
    s_low = codec.eg_encode(q_low, "auto", True)
    codec.eg_decode(s, validate=False)
    codec.eg_decode(s_low, validate=False)
    torch.cuda.synchronize()
    for name, fn in (
        ("encode", lambda: codec.eg_encode(q, "auto")),
        ("decode", lambda: codec.eg_decode(s, validate=False)),
        ("encode, zero runs", lambda: codec.eg_encode(q_low, "auto", True)),
        ("decode, zero runs", lambda: codec.eg_decode(s_low, validate=False)),
    ):
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        print(f"--- {name}")
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30))


def markdown(rows: list[dict], info: dict) -> str:
    out = [
        f"Device: {info['device']}; torch {info['torch']}, triton {info['triton']}; "
        f"n = {info['n']} elements; medians of {info['repeats']} calls.",
        "",
        "| shape | target H | mode | chunk | bits/elem | encode GB/s | decode GB/s "
        "| code length GB/s | copy GB/s | encode ms | decode ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['shape']} | {r['target_bits']} | {r['mode']} | {r['chunk']} "
            f"| {r['bits_per_elem']:.3f} | {r['encode_GBps']:.1f} | {r['decode_GBps']:.1f} "
            f"| {r['code_length_GBps']:.1f} | {r['copy_GBps']:.0f} | {r['encode_ms']:.2f} "
            f"| {r['decode_ms']:.2f} |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1 << 26, help="elements per data set")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chunks", default="16384,4096", help="chunk sizes, comma-separated")
    ap.add_argument("--out", type=Path, help="folder for bench_codec_gpu.json and .md")
    ap.add_argument(
        "--profile", action="store_true", help="also print torch.profiler's kernel table"
    )
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs a CUDA device (the CPU kernels: tools/bench_codec.py)")
    if args.n <= 0 or args.repeats <= 0:
        ap.error("--n and --repeats must be positive")
    import triton

    info = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "n": args.n,
        "repeats": args.repeats,
    }
    rows = []
    for chunk in (int(c) for c in args.chunks.split(",")):
        for shape, target, mode in CASES:
            rows.append(case(shape, target, mode, args.n, chunk, args.repeats))
            print(json.dumps(rows[-1]), flush=True)
    if args.profile:
        profile(args.n)
    text = markdown(rows, info)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_codec_gpu.json").write_text(json.dumps({"info": info, "rows": rows}))
        (args.out / "bench_codec_gpu.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
