"""A plain PyTorch process holding weights on the GPU, for the CUDA checkpoint demo.

Used when the built-in engine cannot be imported on the GPU machine. It holds
WEIGHTS_MB of random float32 weights (fixed seed) plus a small MLP on DEVICE and
answers on 127.0.0.1:PORT:

  GET /health  -> "ok"
  GET /answer  -> JSON {"weights_bits": int, "output_bits": int, "output_sum": float}

The *_bits fields are exact integer sums of the tensors' raw bits, so a single
flipped bit after a suspend or a CRIU restore changes the answer.

Usage: python torch_target.py --port PORT [--weights-mb N] [--device cuda|cpu]
stdio must not be a pipe to a process outside the tree (CRIU restores pipes
only with their peers): start it with stdin=/dev/null and an O_APPEND log file.
"""

from __future__ import annotations

import argparse
import json
from http.server import BaseHTTPRequestHandler, HTTPServer

import torch

CHUNK = 1 << 24  # elements per checksum step: bounds the int64 temporary to 128 MiB


def bits_checksum(tensor: torch.Tensor) -> int:
    """Exact sum of the float32 tensor's raw 32-bit patterns."""
    flat = tensor.detach().reshape(-1).view(torch.int32)
    total = 0
    for start in range(0, flat.numel(), CHUNK):
        total += int(flat[start : start + CHUNK].to(torch.int64).sum().item())
    return total


class Model:
    def __init__(self, weights_mb: int, device: str) -> None:
        gen = torch.Generator(device="cpu").manual_seed(1234)
        self.device = torch.device(device)
        elements = weights_mb * (1 << 20) // 4
        self.weights = torch.empty(elements, dtype=torch.float32, device=self.device)
        for start in range(0, elements, CHUNK):  # fill in chunks: no full-size host copy
            part = torch.randn(min(CHUNK, elements - start), generator=gen)
            self.weights[start : start + part.numel()].copy_(part)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(512, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256)
        )
        with torch.no_grad():
            for p in self.mlp.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        self.mlp.to(self.device)
        self.inputs = torch.randn(8, 512, generator=gen).to(self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def answer(self) -> dict[str, object]:
        with torch.no_grad():
            out = self.mlp(self.inputs)
        return {
            "weights_bits": bits_checksum(self.weights),
            "output_bits": bits_checksum(out),
            "output_sum": float(out.double().sum().item()),
        }


def serve(model: Model, port: int) -> None:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/health":
                body, kind = b"ok", "text/plain"
            elif self.path == "/answer":
                body, kind = json.dumps(model.answer()).encode(), "application/json"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    HTTPServer(("127.0.0.1", port), Handler).serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--weights-mb", type=int, default=1024)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    model = Model(args.weights_mb, args.device)
    print(f"torch_target: {args.weights_mb} MiB on {args.device}, port {args.port}", flush=True)
    serve(model, args.port)


if __name__ == "__main__":
    main()
