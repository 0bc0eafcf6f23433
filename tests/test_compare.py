"""`fluxfleet compare`: PSNR/SSIM between image directories or job manifests (CPU, no torch)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from producer.cli import app
from producer.imagecompare import psnr, ssim

runner = CliRunner()


def _image(seed: int, size: int = 48) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (size // 8, size // 8, 3)).astype(np.uint8)
    return np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))  # blocky, so SSIM has structure to see


def _save(directory: Path, name: str, array: np.ndarray) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    Image.fromarray(array).save(path)
    return path


def test_psnr_matches_its_formula() -> None:
    a = np.zeros((16, 16))
    b = a + 5.0
    assert math.isclose(psnr(a, b), 10 * math.log10(255**2 / 25))
    assert psnr(a, a) == math.inf


def test_ssim_is_one_for_identical_and_drops_with_noise() -> None:
    a = _image(0)[..., 0].astype(float)
    noise = np.random.default_rng(1).normal(0, 20, a.shape)
    assert math.isclose(ssim(a, a), 1.0, rel_tol=1e-9)
    light, heavy = ssim(a, a + noise / 4), ssim(a, a + noise)
    assert 1.0 > light > heavy > 0.0


def test_compare_directories_by_name(tmp_path: Path) -> None:
    for i in range(3):
        img = _image(i)
        _save(tmp_path / "a", f"{i}.png", img)
        noisy = np.clip(img.astype(int) + (i * 3), 0, 255).astype(np.uint8)
        _save(tmp_path / "b", f"{i}.png", noisy)
    _save(tmp_path / "b", "extra.png", _image(9))
    result = runner.invoke(app, ["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["summary"]["pairs"] == 3 and data["summary"]["only_in_b"] == 1
    by_name = {r["name"]: r for r in data["images"]}
    assert by_name["0.png"]["psnr_db"] == "inf" or math.isinf(float(by_name["0.png"]["psnr_db"]))
    assert float(by_name["1.png"]["psnr_db"]) > float(by_name["2.png"]["psnr_db"])
    # a threshold above what was measured fails the command
    failed = runner.invoke(app, ["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--min-ssim", "1.01"])
    assert failed.exit_code == 1


def test_compare_manifests_pairs_by_prompt_and_seed(tmp_path: Path) -> None:
    def manifest(folder: str, shift: int) -> Path:
        lines = []
        for index, (prompt, seed) in enumerate([("a cat", 1), ("a dog", 2)]):
            img = np.clip(_image(seed).astype(int) + shift, 0, 255).astype(np.uint8)
            path = _save(tmp_path / folder / "images", f"{folder}{index}.png", img)
            params = {"width": 48, "height": 48, "steps": 4, "guidance": 3.5, "max_sequence_length": 64}
            record = {"index": index, "prompt": prompt, "seed": seed, "params": params, "location": str(path)}
            lines.append(json.dumps(record))
        out = tmp_path / folder / "manifest.jsonl"
        out.write_text("\n".join(lines) + "\n")
        return out

    a, b = manifest("bf16", 0), manifest("fast", 2)
    result = runner.invoke(app, ["compare", str(a), str(b), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)["summary"]
    assert summary["pairs"] == 2
    assert math.isclose(summary["mean_psnr_db"], 10 * math.log10(255**2 / 4), rel_tol=1e-3)
    assert summary["mean_ssim"] > 0.99


def test_compare_with_nothing_in_common_exits_2(tmp_path: Path) -> None:
    _save(tmp_path / "a", "x.png", _image(0))
    _save(tmp_path / "b", "y.png", _image(0))
    result = runner.invoke(app, ["compare", str(tmp_path / "a"), str(tmp_path / "b")])
    assert result.exit_code == 2
