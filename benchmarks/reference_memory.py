"""Peak memory of FID reference statistics as the reference set grows: streamed (a lazy split view, batch by batch,
float64 running moments) against the in-memory path (the split stacked into one float32 tensor, then all features).

    python benchmarks/reference_memory.py [--quick]

Each (path, size) runs in a fresh process (peak resident set of that child alone, os.wait4's ru_maxrss). The images
are 3 x 64 x 64, drawn from the index on access (what a zip or an HF data set decodes), the features those of the
offline digits-cnn extractor (64-d; trained first, a few seconds), so the numbers measure the data path, not a
network: Inception's 2048-d features would add 8 KiB per image to the in-memory path and nothing to the streamed one.
"""

import sys
import tempfile
from pathlib import Path

import torch
from _common import arguments, header, table
from peak_memory import peak_of
from torch.utils.data import Dataset

SIDE = 64


class RandomImages(Dataset):
    """n (image in [-1, 1], 0) pairs, image i drawn from seed i when it is read."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        x = torch.rand(3, SIDE, SIDE, generator=torch.Generator().manual_seed(int(i))) * 2 - 1
        return x, torch.tensor(0)


def child(path: str, n: int, weights: str, out: str) -> None:
    """One measurement: the reference statistics of n images by one path (run in its own process)."""
    from torch_fidelity.metric_fid import fid_featuresdict_to_statistics

    from lightning_diffusion.lightning.metrics.extractors import extract_features, load_extractor
    from lightning_diffusion.lightning.metrics.reference import FidelityView, reference_statistics

    torch.set_num_threads(1)
    extractor = load_extractor("digits-cnn", weights, ("fid",))
    images = RandomImages(n)
    if path == "streamed":
        stats = reference_statistics(extractor, lambda: FidelityView(images), f"random{n}", "train", (SIDE, SIDE),
                                     out, batch_size=64).stats["64"]
    else:  # the split as one tensor, then every feature, then the statistics (the path before streaming)
        x = torch.stack([images[i][0] for i in range(n)])
        stats = fid_featuresdict_to_statistics(extract_features(extractor, x, batch_size=64), "64")
    print(float(stats["sigma"].trace()))


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])
    args = arguments(__doc__.splitlines()[0])
    header("Peak memory of reference statistics", args.quick)
    from lightning_diffusion.lightning.metrics.digits_extractor import train_digits_extractor

    sizes = (200, 800) if args.quick else (2000, 8000)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "digits-cnn.pt"
        train_digits_extractor(weights, epochs=1 if args.quick else 20)
        for path in ("streamed", "in-memory"):
            peaks = []
            for n in sizes:
                command = [sys.executable, __file__, "--child", path, str(n), str(weights), f"{tmp}/cache-{path}-{n}"]
                peaks.append(peak_of(command)[0])
            rows.append([path, *peaks, peaks[1] - peaks[0], (peaks[1] - peaks[0]) / (sizes[1] - sizes[0]) * 1024])
    table(f"peak resident memory (MiB) of the reference statistics of {sizes[0]} and {sizes[1]} images of "
          f"3x{SIDE}x{SIDE}", ["path", f"n = {sizes[0]}", f"n = {sizes[1]}", "growth MiB", "KiB per image"], rows)


if __name__ == "__main__":
    main()
