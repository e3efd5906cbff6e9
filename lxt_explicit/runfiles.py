"""The files of a dataset run (:func:`lxt_explicit.dataset.explain_dataset`): resumable, one or many processes.

* Every row is written as one line of JSON and flushed to disk (``fsync``) before the next, so an
  interrupted run loses at most the line being written; :func:`drop_partial_line` removes such a
  cut-off line before the file is continued, and :func:`complete_lines` never reads one.
* On several processes (``WORLD_SIZE`` > 1: ``accelerate launch``, ``torchrun``) process ``p`` of
  ``n`` writes its rows to the shard ``OUTPUT.part-p-of-n`` (each line ``{"index": i, "row": ...}``);
  when every process is done, the first one merges all shards into ``OUTPUT`` in the order of the
  rows, leaves out rows the output already has, and removes the shards.  Shards left by an
  interrupted run (of any number of processes) are merged the same way by the next run.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import os
from pathlib import Path
from typing import Iterator

__all__ = ["RunFiles", "complete_lines", "drop_partial_line", "process_group"]

_CHUNK = 1 << 20


def complete_lines(path) -> Iterator[str]:
    """The lines of a UTF-8 file that end with a newline (a last line without one is left out)."""
    path = Path(path)
    if not path.exists():
        return
    with path.open("r", encoding="utf-8", newline="\n") as file:
        for line in file:
            if line.endswith("\n") and line.strip():
                yield line.rstrip("\n")


def drop_partial_line(path) -> int:
    """Cut a last line without a newline (left by an interrupted write) off the file; returns the bytes removed."""
    path = Path(path)
    if not path.exists():
        return 0
    with path.open("r+b") as file:
        size = file.seek(0, os.SEEK_END)
        end = size
        while end > 0:
            start = max(0, end - _CHUNK)
            file.seek(start)
            chunk = file.read(end - start)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            end = start
        else:
            keep = 0
        if keep < size:
            file.truncate(keep)
            file.flush()
            os.fsync(file.fileno())
        return size - keep


def _keys(path) -> set[str]:
    """Keys (ids as JSON) of the rows in an output file."""
    return {json.dumps(json.loads(line)["id"]) for line in complete_lines(path)}


def process_group():
    """``(process index, number of processes, accelerate state or None)`` of this run."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, None
    try:
        from accelerate import PartialState
    except ImportError:  # pragma: no cover - accelerate is a test dependency
        raise ImportError("a run on several processes (WORLD_SIZE > 1) needs accelerate: "
                          "pip install accelerate") from None
    import torch

    # without an accelerator, accelerate joins the processes only when told to use the CPU (gloo)
    accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    state = PartialState(cpu=not accelerator)
    if state.num_processes != int(os.environ["WORLD_SIZE"]):
        raise RuntimeError(f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but accelerate joined {state.num_processes} "
                           "process(es); start the run with accelerate launch or torchrun")
    return state.process_index, state.num_processes, state


class RunFiles:
    """Output file and shards of a dataset run in this process.

    Parameters
    ----------
    output : str or path
        The JSON Lines file the run writes (its folder is created if missing).
    """

    def __init__(self, output):
        self.output = Path(output)
        if self.output.is_dir():
            raise ValueError(f"output {self.output} is a folder; give the path of a .jsonl file")
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.process, self.processes, self._state = process_group()

    def shard(self, process: int | None = None, processes: int | None = None) -> Path:
        """The shard file of a process."""
        process = self.process if process is None else process
        processes = self.processes if processes is None else processes
        return self.output.with_name(f"{self.output.name}.part-{process}-of-{processes}")

    def shards(self) -> list[Path]:
        """Every shard file of this output, of any number of processes."""
        return sorted(self.output.parent.glob(f"{self.output.name}.part-*-of-*"))

    def done_keys(self) -> set[str]:
        """Keys of the rows already written (to skip); cut-off last lines are dropped first."""
        if self.processes == 1:
            self._merge()  # shards left by an interrupted run on several processes
            drop_partial_line(self.output)
            return _keys(self.output)
        own = self.shard()
        drop_partial_line(own)
        done = _keys(self.output)
        others = [s for s in self.shards() if not s.name.endswith(f"-of-{self.processes}")]
        for shard in [own, *others]:
            done.update(json.dumps(json.loads(line)["row"]["id"]) for line in complete_lines(shard))
        return done

    @contextlib.contextmanager
    def writer(self):
        """A function ``write(index, line)`` that appends one row and flushes it to disk."""
        path = self.output if self.processes == 1 else self.shard()
        with path.open("a", encoding="utf-8", newline="\n") as file:

            def write(index: int, line: str) -> None:
                file.write((line if self.processes == 1 else f'{{"index": {index}, "row": {line}}}') + "\n")
                file.flush()
                os.fsync(file.fileno())

            yield write

    def finish(self) -> None:
        """On several processes: wait for all, merge the shards on the first, wait again."""
        if self._state is None:
            return
        self._state.wait_for_everyone()
        if self.process == 0:
            self._merge()
        self._state.wait_for_everyone()

    def _merge(self) -> None:
        shards = self.shards()
        if not shards:
            return
        drop_partial_line(self.output)
        written = _keys(self.output)
        with self.output.open("a", encoding="utf-8", newline="\n") as file:
            for _, row in heapq.merge(*(_indexed(s) for s in shards), key=lambda item: item[0]):
                key = json.dumps(row["id"])
                if key in written:
                    continue
                file.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
                written.add(key)
            file.flush()
            os.fsync(file.fileno())
        for shard in shards:
            shard.unlink()


def _indexed(shard: Path) -> Iterator[tuple[int, dict]]:
    """``(row index, row)`` of a shard's complete lines, in the order written (rising indices)."""
    for line in complete_lines(shard):
        entry = json.loads(line)
        yield entry["index"], entry["row"]
