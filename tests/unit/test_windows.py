"""Window planning emits exactly the audio's frame count; audio neighbourhoods clamp at the edges."""
import pytest
import torch

from infinitetalk.multitalk.windows import audio_windows, covering_window_size, plan_windows, round_window_size


def _emitted(plan):
    frames = []
    for w in plan:
        frames.extend(range(w.start + w.emit_from, w.start + w.emit_from + w.emit_count))
    return frames


@pytest.mark.parametrize("total", [1, 5, 80, 81, 82, 153, 154, 400, 1001])
@pytest.mark.parametrize("window,motion", [(81, 9), (81, 25), (33, 5)])
def test_plan_emits_every_frame_once_in_order(total, window, motion):
    plan = plan_windows(total, window, motion)
    assert _emitted(plan) == list(range(total))
    for w in plan:
        assert (w.num_frames - 1) % 4 == 0 and w.num_frames <= window
        assert w.emit_from + w.emit_count <= w.num_frames
    for prev, nxt in zip(plan, plan[1:]):
        assert nxt.start + nxt.motion_frames == prev.start + prev.emit_from + prev.emit_count
        assert nxt.motion_frames == motion


def test_upstream_example_geometry():
    plan = plan_windows(400, 81, 9)
    assert [w.start for w in plan] == [0, 72, 144, 216, 288, 360]
    assert plan[-1].num_frames == 41 and plan[-1].emit_count == 31
    assert plan[1].latent_frames == 21 and plan[1].motion_latent_frames == 3


def test_window_size_rounding():
    assert round_window_size(81) == 81 and round_window_size(84) == 81 and round_window_size(3) == 1
    assert covering_window_size(81) == 81 and covering_window_size(82) == 85 and covering_window_size(1) == 1


def test_bad_geometry_is_rejected_with_a_reason():
    with pytest.raises(ValueError, match="motion_frame"):
        plan_windows(100, 81, 81)
    with pytest.raises(ValueError, match="shorter than one frame"):
        plan_windows(0, 81, 9)


def test_audio_windows_gather_clamped_neighbourhoods():
    feats = torch.arange(10, dtype=torch.float32)[:, None, None].expand(10, 2, 3)
    win = audio_windows(feats, 0, 4)
    assert win.shape == (4, 5, 2, 3)
    assert win[0, :, 0, 0].tolist() == [0, 0, 0, 1, 2]
    assert win[3, :, 0, 0].tolist() == [1, 2, 3, 4, 5]
    tail = audio_windows(feats, 8, 3)
    assert tail[2, :, 0, 0].tolist() == [8, 9, 9, 9, 9]
