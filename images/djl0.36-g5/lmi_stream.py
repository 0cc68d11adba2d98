"""lmi_stream: token streaming for the DeepSpeed and Accelerate ways of lmi_deepspeed (`option.enable_streaming`).

Copied verbatim beside lmi_deepspeed.py into every image (/opt/lmi/python). As the LMI DeepSpeed containers
streamed (DJL Serving 0.27's own handler, djl_python/deepspeed.py with properties_manager/properties.py:
facts and sources in buildkit/data/djl.yaml, behaviour `stream_*`):

    option.enable_streaming=true    every request of the model is answered as a stream (false: the default)

The answer is `application/jsonlines`, one line per generation step that produced text, in the shape of
djl_python's default stream formatter (outputs.py, `_default_stream_output_formatter`): {"outputs": [text, ...]},
one text per prompt of the request (a request's "inputs" may be a list). The last line also says why each
prompt's generation stopped: {"outputs": [...], "finish_reason": ["length" | "eos_token" | "cancelled" |
"error", ...]} (with "error": message when the model raised). The lines' texts joined are the non-streamed
answer: text is decoded from every token so far (`TextDecoder`), and a piece is sent only once it can no longer
change (never half a multi-byte character, never a merged token twice).

A stream answers one request at a time: a dynamic batch is refused (as LMI refused it: "Dynamic batch not
supported for generic streaming"), as are LMI's `huggingface` streamer (per-token decoding, which splits
multi-byte characters) and streaming a diffusion pipeline. DJL never tells the Python side that a client went
away (djl.yaml `stream_client_gone`): a stream stops early only when whoever reads it closes or drops it (e.g.
DJL's worker connection breaks); then every rank stops at the same token.

Under tensor parallelism every rank generates in step (lmi_deepspeed's `Ranks` broadcasts each request) and
rank 0 tells the others, at every step, whether to stop. DJL streams the answer of one rank (djl.yaml
`stream_routing`): rank 0's with passive workers; with every rank asked, the last rank's, which streams its
own generation as it goes.

Importing this module costs nothing: torch and Transformers load with the model.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading

log = logging.getLogger("lmi_stream")

CONTENT_TYPE = "application/jsonlines"  # what LMI's DeepSpeed handler answered a stream with
_END = object()


def _handler():
    """lmi_deepspeed (imported late: it imports this module lazily too)."""
    import lmi_deepspeed

    return lmi_deepspeed


def parse_streaming(props: dict, way: str = "deepspeed") -> bool:
    """option.enable_streaming -> whether answers stream; what LMI allowed and this handler does not, or what
    is not an LMI value, is an OptionError of one line."""
    option_error = _handler().OptionError
    raw = props.get("enable_streaming", "false")
    value = str(raw).strip().lower()
    if value in ("false", ""):
        return False
    if value == "huggingface":
        raise option_error("option.enable_streaming=huggingface: LMI's per-token streamer splits multi-byte "
                           "characters; use option.enable_streaming=true (the same jsonlines, decoded safely)")
    if value != "true":
        raise option_error(f"option.enable_streaming={raw!r}: use true or false")
    if way == "lmi_diffusion":
        raise option_error("option.enable_streaming=true: a diffusion pipeline answers one image, not tokens; "
                           "remove the option")
    batch = str(props.get("batch_size", "1")).strip()
    if batch.isdigit() and int(batch) > 1:
        raise option_error(f"option.enable_streaming=true streams one request at a time, but batch_size={batch}; "
                           "remove batch_size (or set it to 1)")
    return True


class TextDecoder:
    """Text of one sequence, token by token: `push(ids)` -> the new text that can no longer change, `finish()`
    -> the rest. The pieces joined are exactly tokenizer.decode(all ids) with the same arguments.

    Each push decodes every id so far (as the non-streamed answer does, so merged tokens, byte-level BPE and
    SentencePiece's spaces come out the same) and sends what lies beyond what was sent, holding back a
    trailing U+FFFD (half of a multi-byte character whose other bytes are in later tokens) and, where the
    tokenizer cleans up spaces before punctuation (clean_up_tokenization_spaces), the text from the last
    space on (a later token may still remove that space)."""

    def __init__(self, tokenizer, **decode_kwargs) -> None:
        self.tokenizer = tokenizer
        self.kwargs = {"skip_special_tokens": True, **decode_kwargs}
        cleanup = self.kwargs.get("clean_up_tokenization_spaces",
                                  getattr(tokenizer, "clean_up_tokenization_spaces", False))
        self.hold_space = bool(cleanup)
        self.ids: list[int] = []
        self.sent = ""

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, **self.kwargs)

    def push(self, ids) -> str:
        self.ids.extend(int(i) for i in ids)
        text = self._text()
        if not text.startswith(self.sent):  # an earlier piece changed: wait for the end (finish sends the rest)
            return ""
        end = len(text)
        while end > len(self.sent) and text[end - 1] == "\ufffd":
            end -= 1
        if self.hold_space:
            space = text.rfind(" ", len(self.sent), end)
            if space >= 0:
                end = space
        piece = text[len(self.sent):end]
        self.sent += piece
        return piece

    def finish(self) -> str:
        text = self._text()
        piece = text[len(self.sent):] if text.startswith(self.sent) else ""
        if not text.startswith(self.sent):
            log.warning("lmi_stream: the text sent differs from the final decoding; the final text was: %r", text)
        self.sent += piece
        return piece


def line(outputs: list[str], **extra) -> bytes:
    """One jsonlines line in LMI's stream shape (djl_python outputs.py, _default_stream_output_formatter)."""
    return (json.dumps({"outputs": outputs, **extra}) + "\n").encode("utf-8")


class Stream:
    """The lines of one streamed answer, as they are generated: an iterator for djl_python's Output.send
    (add_stream_content). close() (or dropping it unread) asks the generation to stop at the next token."""

    def __init__(self) -> None:
        self.lines: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()
        self.finished = threading.Event()
        self.tokens = 0  # tokens generated so far (per prompt)
        self.finish_reason: list[str] = []

    def __iter__(self):
        return self

    def __next__(self) -> bytes:
        item = self.lines.get()
        if item is _END:
            self.lines.put(_END)
            raise StopIteration
        return item

    def close(self) -> None:
        self.cancelled.set()

    def __del__(self) -> None:
        self.cancelled.set()


class _Streamer:
    """What Transformers' generate calls with each step's tokens (its BaseStreamer protocol: put, end)."""

    def __init__(self, stream: Stream, decoders: list[TextDecoder], eos: set[int]) -> None:
        self.stream, self.decoders, self.eos = stream, decoders, eos
        self.prompt_seen = False
        self.done = [False] * len(decoders)
        self.reason = ["length"] * len(decoders)

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate's first put is the prompt
            self.prompt_seen = True
            return
        ids = value.reshape(len(self.decoders), -1).tolist()
        pieces = []
        for i, (decoder, step) in enumerate(zip(self.decoders, ids, strict=True)):
            if self.done[i]:  # after its end of sequence a row gets padding
                pieces.append("")
                continue
            if any(t in self.eos for t in step):
                self.done[i], self.reason[i] = True, "eos_token"
            pieces.append(decoder.push(step))
        self.stream.tokens += 1
        if any(pieces):
            self.stream.lines.put(line(pieces))

    def end(self) -> None:
        pass


def _stopping_criteria(stream: Stream, group):
    """A stopping criterion that stops every row when the stream is cancelled; with several ranks rank 0 decides
    and tells the others at every step (the ranks must run the same number of steps, or their collectives hang)."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Cancel(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            stop = stream.cancelled.is_set()
            if group is not None:
                import torch.distributed as dist

                flag = torch.tensor([1 if stop else 0], dtype=torch.int32)
                dist.broadcast(flag, src=0, group=group)
                stop = bool(flag.item())
            return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([Cancel()])


def generate(service, job, stream: Stream, group=None) -> None:
    """Generate one checked request (lmi_deepspeed's Job: its prompts' token ids and parameters) from the
    arguments lmi_deepspeed's Service.generate uses (Service.generate_inputs: the same tokens), sending text into
    `stream` step by step; the last line says why each prompt stopped."""
    import torch

    tokenizer, params = service.tokenizer, job.params
    decoders = [TextDecoder(tokenizer) for _ in job.ids]
    eos = tokenizer.eos_token_id
    streamer = _Streamer(stream, decoders, set(eos if isinstance(eos, list) else [eos]) - {None})
    try:
        if params.get("return_full_text"):
            stream.lines.put(line(list(job.prompts)))
        batch, kwargs = service.generate_inputs(job.ids, params)  # the arguments of the non-streamed answer
        with torch.no_grad():
            service.engine.module.generate(**batch, **kwargs, streamer=streamer,
                                           stopping_criteria=_stopping_criteria(stream, group))
        reasons = ["cancelled" if stream.cancelled.is_set() and not done else reason
                   for done, reason in zip(streamer.done, streamer.reason, strict=True)]
        stream.finish_reason = reasons
        stream.lines.put(line([d.finish() for d in decoders], finish_reason=reasons))
    except Exception as exc:  # the headers are sent: the last line carries the error
        log.exception("lmi_stream: generation failed")
        stream.finish_reason = ["error"] * len(job.ids)
        stream.lines.put(line([d.finish() for d in decoders], finish_reason=stream.finish_reason,
                              error=f"{type(exc).__name__}: {_handler().first_line(exc)}"))
    finally:
        stream.finished.set()
        stream.lines.put(_END)


class Streaming:
    """lmi_deepspeed's glue, streaming: put in place of the way's service in `Ranks` (rank 0 decides with
    `prepare_all`, every rank runs the decisions with `run`, in step; one process calls `answer`) and asked by
    `handle` for each request DJL sends this rank.

    Rank 0 (and a single process) generates in a thread of its own and hands DJL the live stream. Another rank
    generates in the thread that follows rank 0 (so its collectives stay in order) and, when DJL asks it too
    (every-rank routing, where DJL returns the LAST rank's answer), hands DJL the same live stream."""

    def __init__(self, ranks) -> None:
        self.ranks, self.service = ranks, ranks.service
        ranks.service = self
        self.rank, self.world = ranks.rank, ranks.world
        self.thread: threading.Thread | None = None  # rank 0's generation
        self.changed = threading.Condition()
        self.started: list[tuple[int, list]] = []  # another rank: (batch number, answers), the last two
        self.count = self.asked = 0

    def prepare_all(self, requests) -> list:
        """Rank 0's decision on a batch, as the way's service makes it (lmi_deepspeed's Job: parsed, bounded,
        tokenized; or a RequestError each), but a stream answers one request at a time: a batch is refused."""
        h = _handler()
        if len(requests) != 1:
            error = h.RequestError(f"option.enable_streaming=true streams one request at a time, but DJL batched "
                                   f"{len(requests)}; remove batch_size from serving.properties (or set it to 1)")
            return [error] * len(requests)
        return self.service.prepare_all(requests)

    def run(self, jobs) -> list:
        """Every rank, in step, with rank 0's decisions: [a Stream] or the refusals."""
        job = jobs[0] if len(jobs) == 1 else None
        streams = isinstance(job, _handler().Job)
        answers = [Stream()] if streams else list(jobs)
        if self.rank == 0:
            if streams:
                self.thread = threading.Thread(target=self._generate, args=(job, answers[0]),
                                               name="lmi-stream", daemon=True)
                self.thread.start()
            return answers
        with self.changed:  # another rank: DJL may ask for this stream while it is generated
            self.count += 1
            self.started = [*self.started[-1:], (self.count, answers)]
            self.changed.notify_all()
        if streams:
            self._generate(job, answers[0])
        return answers

    def answer(self, requests) -> list:
        """One process: the decisions and the stream."""
        return self.run(self.prepare_all(requests))

    def _generate(self, job, stream) -> None:
        if self.rank == 0 and getattr(self.service, "cuda", False) and self.world > 1:
            import torch

            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # the current device is per thread
        generate(self.service, job, stream, self.ranks.group if self.world > 1 else None)

    def handle(self, inputs, requests):
        """DJL's call on this rank: rank 0 starts the generation on every rank; another rank hands over the
        stream its follower thread started for the same request."""
        if self.rank == 0:
            if self.thread is not None:  # a stream dropped early: its last steps end before the next broadcast
                self.thread.join()
            answers = self.ranks.answer(requests)
        else:
            self.asked += 1
            with self.changed:
                self.changed.wait_for(lambda: any(n == self.asked for n, _ in self.started))
                answers = next(a for n, a in self.started if n == self.asked)
        return self.output(inputs, answers)

    @staticmethod
    def output(inputs, answers):
        """DJL's Output: a refused batch as one error for all (DJL gives every request of a batch the Output's
        code); a refused request as lmi_deepspeed answers it; a stream as djl_python streams content."""
        from djl_python.outputs import Output

        h = _handler()
        if len(answers) > 1:
            return Output().error(str(answers[0]), code=400, message="bad request")
        if isinstance(answers[0], BaseException):
            return h._output(inputs, answers)
        output = Output().add_property("content-type", CONTENT_TYPE)
        return output.add_stream_content(answers[0], output_formatter=None)


def attach(ranks, props: dict) -> Streaming | None:
    """Streaming put in place of `ranks`' service when serving.properties asks for it; None otherwise."""
    return Streaming(ranks) if parse_streaming(props) else None
