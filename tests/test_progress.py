"""Live progress of the bench's child trainings: the progress file a child writes, the log bar the parent falls
back on, the phase line, and what the parent prints on a terminal and elsewhere. Fake progress files and fake
clocks, no training."""
import io
import json
import os
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import pytest
from tqdm import tqdm

from privlora import benchjobs as bench, progress
from privlora.benchspec import BenchSpec, Job
from privlora.progress import Board, Watch, job_meter, job_status, phase_line, read_progress, report, tail_bar


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_report_writes_a_rate_limited_file_only_when_asked(tmp_path, monkeypatch):
    target = tmp_path / "progress.json"
    monkeypatch.delenv(progress.ENV, raising=False)
    report(1, 10)
    assert not target.exists()  # no variable: a no-op
    monkeypatch.setenv(progress.ENV, str(target))
    report(1, 10)
    first = json.loads(target.read_text())
    assert first["phase"] == "train" and (first["step"], first["total"]) == (1, 10)
    assert first["started"] <= first["time"]
    report(2, 10)  # within the second: not written
    assert read_progress(target) == (1, 10)
    report(10, 10)  # the last step always is
    assert read_progress(target) == (10, 10)
    assert [p.name for p in tmp_path.iterdir()] == ["progress.json"]  # no temporary file left


def test_report_never_fails_a_training(tmp_path, monkeypatch):
    monkeypatch.setenv(progress.ENV, str(tmp_path / "missing-folder" / "progress.json"))
    report(5, 10)


def test_read_progress_tolerates_missing_and_torn_files(tmp_path):
    assert read_progress(tmp_path / "none.json") is None
    (tmp_path / "torn.json").write_text('{"step": 3, "tot')
    assert read_progress(tmp_path / "torn.json") is None


def test_the_log_fallback_reads_the_last_bar_of_the_childs_own_tqdm(tmp_path):
    log = tmp_path / "train.log"
    with open(log, "w") as f:  # what `privlora train` writes into <run>/train.log: \r-separated bar states
        f.write("loading the model\n")
        other = tqdm(total=5, desc="smp_lora", file=f, mininterval=0)
        other.update(4)
        other.close()
        bar = tqdm(total=120, desc="lora", file=f, mininterval=0, dynamic_ncols=True)
        for _ in range(7):
            bar.update(1)
            bar.set_postfix({"L_ada": "0.1234"})
        bar.write("epoch 1: L_adv 0.5")
        bar.update(2)
        f.flush()
        assert tail_bar(log, "lora") == (9, 120)
        assert tail_bar(log, "smp_lora") == (4, 5)  # "smp_lora" is not taken for "lora"
        bar.close()
    assert tail_bar(log, "dp_lora") is None
    assert tail_bar(tmp_path / "absent.log", "lora") is None


def test_a_watch_prefers_the_progress_file_and_measures_its_rate_from_the_first_sight(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("\rlora:  10%|#         | 10/100 [00:10<01:30,  1.00it/s]")
    watch = Watch("lora", since=0.0, progress_file=tmp_path / "progress.json", log_file=log, desc="lora")
    watch.poll(5.0)
    assert (watch.step, watch.total, watch.rate(5.0), watch.eta(5.0)) == (10, 100, None, None)
    progress.write_progress(tmp_path / "progress.json", {"step": 30, "total": 100})
    watch.poll(15.0)  # 20 steps in 10 s since the first sight
    assert (watch.step, watch.rate(15.0), watch.eta(15.0)) == (30, 2.0, 35.0)
    assert job_status(watch, 15.0) == "lora 30/100 steps, ETA 00:35"
    line = job_meter(watch, 15.0, 80)
    assert line.startswith("lora:  30%|") and "30/100 [00:15<00:35,  2.00step/s]" in line and len(line) <= 80


def test_the_phase_line_brackets_the_phase_under_way():
    assert phase_line("audit", "x") == "bench: train → select → [audit] → quality → table · x"
    assert phase_line(None) == "bench: train → select → audit → quality → table"


def fake_job(tmp_path: Path, name: str, step: int | None, total: int = 100) -> Path:
    path = tmp_path / f"{name}.json"
    if step is not None:
        progress.write_progress(path, {"step": step, "total": total})
    return path


def test_off_a_terminal_status_comes_as_occasional_plain_lines_without_carriage_returns(tmp_path, monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    out, clock = io.StringIO(), Clock()
    board = Board(log=lambda m: print(m, file=out), stream=out, every=60, clock=clock)
    assert not board.live
    board.expect(3, "trainings")
    board.enter("train", "3 to train")
    board.start("lora", fake_job(tmp_path, "lora", 10))
    board.start("smp_lora", fake_job(tmp_path, "smp_lora", None))
    board.refresh()
    clock.t += 30
    progress.write_progress(tmp_path / "lora.json", {"step": 40, "total": 100})
    board.refresh()  # 30 s: no line yet
    clock.t += 30
    board.refresh()
    board.finish("lora")
    board.refresh()  # just printed: quiet
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    assert text.splitlines() == [
        "bench: [train] → select → audit → quality → table · 3 to train",
        "train: 0/3 trainings done · lora 40/100 steps, ETA 02:00 · smp_lora starting",  # 30 steps in 60 s,
        "lora: finished after 01:00 (1/3 trainings done)",
    ]


def test_tqdm_disable_keeps_a_terminal_to_plain_lines(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert not Board(stream=Terminal()).live
    monkeypatch.delenv("TQDM_DISABLE")
    assert Board(stream=Terminal()).live


def test_on_a_terminal_each_running_job_has_a_live_bar_under_the_phase_line(tmp_path, monkeypatch):
    monkeypatch.setattr(progress.shutil, "get_terminal_size", lambda fallback: os.terminal_size((100, 30)))
    screen, said, clock = Terminal(), [], Clock()
    board = Board(log=said.append, stream=screen, clock=clock)
    assert board.live
    board.expect(2, "trainings")
    board.phase = "train"
    board.start("lora", fake_job(tmp_path, "lora", 10))
    board.start("mp_lora", fake_job(tmp_path, "mp_lora", 5, total=50))
    board.refresh()
    clock.t += 10
    progress.write_progress(tmp_path / "lora.json", {"step": 30, "total": 100})
    board.refresh()
    drawn = screen.getvalue()
    assert "bench: [train] → select → audit → quality → table · 0/2 trainings done" in drawn
    assert "30/100 [00:10<00:35,  2.00step/s]" in drawn and "mp_lora:  10%|" in drawn
    assert len(board._bars) == 3 and [b.pos for b in board._bars] == [0, -1, -2]  # phase line, then one per job
    board.say("a log line")  # goes through tqdm's external write mode, bars kept
    assert said == ["a log line"] and board._bars
    board.close()
    assert board._bars == [] and not any(getattr(b, "fp", None) is screen for b in tqdm._instances)


def test_wait_ends_each_job_as_it_completes_and_raises_the_first_failure_in_order(tmp_path):
    said: list[str] = []
    board = Board(log=said.append, stream=io.StringIO(), every=0)
    board.expect(3, "trainings")
    futures = {Future(): "a", Future(): "b", Future(): "c"}
    fa, fb, fc = futures

    def complete():
        time.sleep(0.05)
        fc.set_result(None)
        fb.set_exception(RuntimeError("b broke"))
        fa.set_result(None)

    threading.Thread(target=complete).start()
    with pytest.raises(RuntimeError, match="b broke"):
        board.wait(futures, poll=0.01)
    assert sorted(line.split(" (")[0] for line in said) == ["a: finished", "b: failed", "c: finished"]
    assert board.done == 3 and "b: failed (b broke)" in said


# --- the bench's training phase, with fake trainings ------------------------------------------------------------

def fake_jobs(tmp_path: Path, names: list[str]) -> list[Job]:
    return [Job(n, n, 0, {"output_dir": str(tmp_path / n)}) for n in names]


def test_parallel_trainings_show_the_phase_line_and_each_finish_and_no_carriage_return(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)

    def fake_child(spec, job, threads, log, board):
        log(f"training {job.name} in a child process")
        board.start(job.name, fake_job(tmp_path, job.name, 50))
        time.sleep(0.05)
        if job.name == "bad":
            raise bench.PrivloraError("bad failed")

    monkeypatch.setattr(bench, "train_in_child", fake_child)
    spec = BenchSpec(out=tmp_path, runs={}, jobs=2, threads_per_job=1)
    with pytest.raises(bench.PrivloraError, match="bad failed"):
        bench.train_all(spec, fake_jobs(tmp_path, ["lora", "bad", "smp_lora"]), print)
    captured = capsys.readouterr()
    printed = captured.out.splitlines()
    assert printed[0] == "bench: [train] → select → audit → quality → table · 3 to train, 0 reused, 2 at a time"
    assert {"training lora in a child process", "bad: failed after 00:00 (bad failed)"} <= set(printed)
    assert sum(line.startswith(("lora: finished", "smp_lora: finished")) for line in printed) == 2
    assert "\r" not in captured.out + captured.err


def test_serial_trainings_show_the_same_phase_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "train_here", lambda spec, job, log: log(f"training {job.name}"))
    spec = BenchSpec(out=tmp_path, runs={}, jobs=1)
    bench.train_all(spec, fake_jobs(tmp_path, ["lora", "smp_lora"]), print)
    assert capsys.readouterr().out.splitlines() == [
        "bench: [train] → select → audit → quality → table · 2 to train, 0 reused",
        "training lora", "lora: finished after 00:00 (1/2 trainings done)",
        "training smp_lora", "smp_lora: finished after 00:00 (2/2 trainings done)",
    ]
