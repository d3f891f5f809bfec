"""`--max-memory`: the same output bit for bit under any limit, with the tile states and idle weights really
spilled to disk; the spill folder removed after success, errors and Ctrl-C; clear failures for a limit too
small for one tile batch and for a disk without room.

The process's RSS is replaced by 0 here (`rss_bytes`), so the tiny model's budgets count only what the plan
estimates, and tiny budgets make the spilling happen."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from osediff.cli import main
from osediff.core import memory
from osediff.core.memory import GIB, RESERVE, MemoryBudgetError, SpillSpaceError
from osediff.tiling import store
from osediff.tiling.vae import decode_cost, encode_cost

# force the tiled VAE at tiny sizes (and no small-input guard: 40×64 -> 160×256, a 20×32 latent)
TILED = dict(vae_encoder_tile=64, vae_decoder_tile=8, process_size=8)


@pytest.fixture
def spilled(monkeypatch, tiny_pipe):
    """Bytes written to spill files during the test. The process's RSS is stood in for by the bytes of the tiny
    model's weights now in memory (so parking the UNet makes room, as it does in a real process)."""
    monkeypatch.setattr(memory, "rss_bytes", lambda: _weights(tiny_pipe))
    count = {"bytes": 0}
    write = store.SpillFolder.write

    def counting(self, t):
        count["bytes"] += t.numel() * t.element_size()
        return write(self, t)

    monkeypatch.setattr(store.SpillFolder, "write", counting)
    return count


def _weights(pipe) -> int:
    m = pipe.model
    return sum(p.numel() * p.element_size() for part in (m.unet, m.vae, m.text_encoder) for p in part.parameters())


def _x(seed=0, h=40, w=64):
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _budgets(pipe, x, fractions=(0.02, 0.5)):
    """GiB limits for x: the weights without the UNet, one tile batch's work, and a fraction of the tile states
    (from 'just one tile batch' to 'most states in memory')."""
    vae, (w, h) = pipe.model.vae, pipe.with_options(**TILED).plan(x.shape[3], x.shape[2]).up
    enc = encode_cost(vae, (1, 3, h, w), tile=TILED["vae_encoder_tile"], element_size=4)
    dec = decode_cost(vae, (1, 4, h // 8, w // 8), tile=TILED["vae_decoder_tile"], element_size=4)
    unet = sum(p.numel() * p.element_size() for p in pipe.model.unet.parameters())
    base = _weights(pipe) - unet + RESERVE * max(enc.peak, dec.peak)
    return [(base + f * max(enc.states, dec.states)) / GIB for f in fractions]


@pytest.mark.slow  # ~1-2 minutes on a busy 2-core machine
def test_the_output_is_bit_identical_under_any_limit(tiny_pipe, spilled, tmp_path):
    x = _x()
    free = tiny_pipe.with_options(**TILED, max_memory=0)(x)  # no limit: the in-memory path
    assert spilled["bytes"] == 0
    for gib in _budgets(tiny_pipe, x):
        before = spilled["bytes"]
        y = tiny_pipe.with_options(**TILED, max_memory=gib, spill_dir=str(tmp_path / "spill"))(x)
        assert spilled["bytes"] > before, f"{gib} GiB did not spill"
        assert torch.equal(y, free), f"{gib} GiB changed the output"
    assert not (tmp_path / "spill").exists()
    auto = tiny_pipe.with_options(**TILED)(x)  # the automatic limit (room enough), after the weights came back
    assert torch.equal(auto, free)


def test_an_untiled_run_parks_the_idle_weights_and_is_unchanged(tiny_pipe, spilled, tmp_path):
    x, opts = _x(1, 16, 16), dict(process_size=8)
    free = tiny_pipe.with_options(**opts, max_memory=0)(x)
    vae = tiny_pipe.model.vae
    work = RESERVE * max(encode_cost(vae, (1, 3, 64, 64), element_size=4).peak,
                         decode_cost(vae, (1, 4, 8, 8), element_size=4).peak)
    gib = (_weights(tiny_pipe) + work) / GIB * 0.99  # the UNet must go
    y = tiny_pipe.with_options(**opts, max_memory=gib, spill_dir=str(tmp_path / "s"))(x)
    assert spilled["bytes"] > 0 and torch.equal(y, free) and not (tmp_path / "s").exists()


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_the_spill_folder_is_removed_after_an_error_or_an_interrupt(tiny_pipe, spilled, tmp_path, error):
    x, folder = _x(2), tmp_path / "spill"
    gib = _budgets(tiny_pipe, x)[0]
    seen = []

    unet = {k: v.clone() for k, v in tiny_pipe.model.unet.state_dict().items()}

    def progress(stage, done, total):
        if stage == "encode" and done == 3:
            seen.append(list(folder.rglob("*.bin")))  # spill files exist while the run goes on
            raise error("stop")

    with pytest.raises(error):
        tiny_pipe.with_options(**TILED, max_memory=gib, spill_dir=str(folder))(x, progress=progress)
    assert seen and seen[0], "nothing was spilled before the interruption"
    assert not folder.exists()
    # the UNet parked for the VAE is back, bit for bit
    after = tiny_pipe.model.unet.state_dict()
    assert after.keys() == unet.keys() and all(torch.equal(after[k], v) for k, v in unet.items())


def test_a_user_spill_dir_is_kept_and_only_our_folder_removed(tiny_pipe, spilled, tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    x = _x(3)
    tiny_pipe.with_options(**TILED, max_memory=_budgets(tiny_pipe, x)[0], spill_dir=str(tmp_path))(x)
    assert spilled["bytes"] > 0 and [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


def test_a_limit_too_small_for_one_tile_batch_fails_with_the_numbers(tiny_pipe, spilled, tmp_path):
    with pytest.raises(MemoryBudgetError, match=r"too small: one tile batch of the VAE (encoder|decoder) needs "
                                                r"about .* (GiB|MiB) beside .* in use.*give at least"):
        tiny_pipe.with_options(**TILED, max_memory=1e-7, spill_dir=str(tmp_path / "s"))(_x())
    assert not (tmp_path / "s").exists()


def test_a_disk_without_room_fails_before_spilling(tiny_pipe, spilled, tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "free_disk_bytes", lambda path: 1000)
    x = _x()
    with pytest.raises(SpillSpaceError, match=r"spill up to .* GB to .*, but that disk has 0.0 GB free"):
        tiny_pipe.with_options(**TILED, max_memory=_budgets(tiny_pipe, x)[0], spill_dir=str(tmp_path / "s"))(x)
    assert spilled["bytes"] == 0 and not (tmp_path / "s").exists()


def test_progress_counts_every_tile_step_of_the_tiled_vae(tiny_pipe):
    calls = []
    tiny_pipe.with_options(**TILED)(_x(), progress=lambda *a: calls.append(a))
    for stage in ("encode", "decode"):
        steps = [(d, t) for s, d, t in calls if s == stage]
        assert steps[0][0] == 0 and steps[-1][0] == steps[-1][1] > 1
        assert [d for d, _ in steps] == sorted(d for d, _ in steps)


def test_spilled_tensors_come_back_with_their_bytes_and_strides(tmp_path):
    folder = store.SpillFolder(tmp_path / "s")
    for t in (torch.randn(2, 8, 5, 7).to(torch.bfloat16), torch.randn(1, 8, 5, 7).to(memory_format=torch.channels_last),
              torch.randn(3, 9)[:, ::2]):
        back = folder.read(folder.write(t), "cpu")
        assert back.stride() == t.stride() and back.dtype == t.dtype and torch.equal(back, t)
    folder.close()
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_the_cli_writes_the_same_file_under_a_small_limit(tmp_path, sr_args, spilled, tiny_pipe):
    src = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 64, 3), dtype=np.uint8)).save(src)
    flags = [*sr_args, "--vae-encoder-tile", "64", "--vae-decoder-tile", "8", "--process-size", "8"]
    assert main(["sr", str(src), "-o", str(tmp_path / "free"), *flags, "--max-memory", "0"]) == 0
    assert spilled["bytes"] == 0
    gib = _budgets(tiny_pipe, torch.zeros(1, 3, 40, 64), (0.1,))[0] + _weights(tiny_pipe) / GIB  # no parking
    assert main(["sr", str(src), "-o", str(tmp_path / "small"), *flags, "--max-memory", f"{gib:.9f}"]) == 0
    assert spilled["bytes"] > 0
    assert (tmp_path / "small/in.png").read_bytes() == (tmp_path / "free/in.png").read_bytes()
    assert not Path(tmp_path / "small/.osediff-spill").exists()


def test_the_guard_spills_resident_states_when_the_process_grows(tmp_path):
    class T:  # what the store needs of a lockstep tile: its state tensors
        def __init__(self, seed):
            self.h = torch.randn(4, 6, generator=torch.Generator().manual_seed(seed))
            self.skip = self.h if seed % 2 else torch.randn(4, 6)

    tiles = [T(i) for i in range(3)]
    want = [(t.h.clone(), t.skip.clone()) for t in tiles]
    s = store.TileStore("cpu", [store.Tier(None, float("inf"))], store.SpillFolder(tmp_path / "s"))
    for t in tiles:
        s.park(t)
    s.pressure = lambda: s.tiers[0].used - 200  # over the limit while more than ~one state is in memory
    s.fetch(tiles[0])  # spills the others (latest parked first), never the tile about to run
    assert tiles[0].h is not None and tiles[1].h is None and tiles[2].h is None
    for t, (h, skip) in zip(tiles, want):
        s.fetch(t)
        assert torch.equal(t.h, h) and torch.equal(t.skip, skip) and (t.skip is t.h) == (t is tiles[1])
    s.spill.close()


def test_one_warning_says_when_and_where_spilling_starts(tiny_pipe, spilled, tmp_path, caplog):
    x = _x(4)
    with caplog.at_level("INFO", logger="osediff.core.memory"):
        tiny_pipe.with_options(**TILED, max_memory=_budgets(tiny_pipe, x)[0], spill_dir=str(tmp_path / "s"))(x)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "tile states (up to" in warnings[0] and str(tmp_path / "s") in warnings[0]
    assert any("spilled" in r.getMessage() and "GB to disk" in r.getMessage() for r in caplog.records)


def test_dry_run_says_which_limit_and_why(tmp_path, capsys, monkeypatch):
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "a.png")
    assert main(["sr", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), "--dry-run", "--max-memory", "3"]) == 0
    out = capsys.readouterr().out
    assert "# max memory: 3.00 GiB (--max-memory 3)" in out and str(tmp_path / "o" / ".osediff-spill") in out
    monkeypatch.setattr(memory, "available_bytes", lambda: 10 * GIB)
    monkeypatch.setattr(memory, "rss_bytes", lambda: GIB)
    assert main(["sr", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), "--dry-run", "--device", "cpu"]) == 0
    assert "# max memory: 10.00 GiB (auto: 90% of the 10.0 GiB of memory available now + 1.0 GiB held" in (
        capsys.readouterr().out)
    assert not (tmp_path / "o").exists()
