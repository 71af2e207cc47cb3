"""Server metrics in the Prometheus text exposition format (no client library needed).

Updated by the engine thread (engine state, tokens, latencies) and by the HTTP
side (responses by status code); rendered by ``GET /metrics``.  One lock guards
everything: updates are a few additions.
"""

from __future__ import annotations

import bisect
import threading

from jaxserve.sequence import RequestOutput

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]):
        self.name = name
        self.help_text = help_text
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help_text}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, n in zip(self.buckets, self.counts):
            cumulative += n
            lines.append(f'{self.name}_bucket{{le="{bound}"}} {cumulative}')
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {self.count}')
        lines.append(f"{self.name}_sum {self.total}")
        lines.append(f"{self.name}_count {self.count}")
        return lines


class ServerMetrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.engine_state = dict(running=0, waiting=0, pages_used=0, pages_total=0, steps=0, at=0.0, spec=None)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.requests_admitted = 0
        self.finished: dict[str, int] = {"stop": 0, "length": 0, "abort": 0}
        self.responses: dict[int, int] = {}
        self.http_in_flight = 0
        self.ttft = Histogram("jaxserve_time_to_first_token_seconds",
                              "Seconds from arrival to the first generated token.", TTFT_BUCKETS)
        self.tpot = Histogram("jaxserve_time_per_output_token_seconds",
                              "Seconds per generated token after the first (per finished request).",
                              TPOT_BUCKETS)
        self.e2e = Histogram("jaxserve_e2e_request_latency_seconds",
                             "Seconds from arrival to the last token (finished requests).", E2E_BUCKETS)

    # -- engine thread --------------------------------------------------------------------------

    def set_engine_state(self, **state) -> None:
        with self._lock:
            self.engine_state.update(state)

    def on_admitted(self, num_requests: int, prompt_tokens: int) -> None:
        with self._lock:
            self.requests_admitted += num_requests
            self.prompt_tokens += prompt_tokens

    def on_output(self, out: RequestOutput) -> None:
        with self._lock:
            self.generation_tokens += len(out.new_token_ids)
            if not out.finished:
                return
            reason = out.finish_reason or "abort"
            self.finished[reason] = self.finished.get(reason, 0) + 1
            if reason == "abort" or out.first_token_time is None or out.finish_time is None:
                return
            self.ttft.observe(out.first_token_time - out.arrival_time)
            self.e2e.observe(out.finish_time - out.arrival_time)
            if len(out.token_ids) > 1:
                self.tpot.observe((out.finish_time - out.first_token_time) / (len(out.token_ids) - 1))

    # -- HTTP side ---------------------------------------------------------------------------------

    def on_response(self, status: int) -> None:
        with self._lock:
            self.responses[status] = self.responses.get(status, 0) + 1

    def add_in_flight(self, delta: int) -> None:
        with self._lock:
            self.http_in_flight += delta

    def render(self) -> str:
        with self._lock:
            s = self.engine_state
            lines = []

            def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
                lines.append(f"# HELP {name} {help_text}")
                lines.append(f"# TYPE {name} {kind}")
                lines.extend(f"{name}{labels} {value}" for labels, value in samples)

            metric("jaxserve_requests_running", "gauge", "Requests in the running batch.", [("", s["running"])])
            metric("jaxserve_requests_waiting", "gauge", "Requests waiting for a slot.", [("", s["waiting"])])
            metric("jaxserve_cache_pages_used", "gauge", "KV-cache pages in use.", [("", s["pages_used"])])
            metric("jaxserve_cache_pages_total", "gauge", "KV-cache pages in all.", [("", s["pages_total"])])
            metric("jaxserve_http_requests_in_flight", "gauge", "Generation HTTP requests being served.",
                   [("", self.http_in_flight)])
            metric("jaxserve_engine_steps_total", "counter", "Engine steps run.", [("", s["steps"])])
            metric("jaxserve_requests_admitted_total", "counter", "Engine requests admitted (one per choice).",
                   [("", self.requests_admitted)])
            metric("jaxserve_requests_finished_total", "counter", "Engine requests finished, by reason.",
                   [(f'{{finish_reason="{k}"}}', v) for k, v in sorted(self.finished.items())])
            metric("jaxserve_prompt_tokens_total", "counter", "Prompt tokens admitted.", [("", self.prompt_tokens)])
            metric("jaxserve_generation_tokens_total", "counter", "Tokens generated.",
                   [("", self.generation_tokens)])
            metric("jaxserve_http_responses_total", "counter", "HTTP responses, by status code.",
                   [(f'{{code="{k}"}}', v) for k, v in sorted(self.responses.items())])
            spec = s.get("spec")
            if spec is not None:  # speculative decoding (Engine.spec_metrics)
                metric("jaxserve_spec_verifications_total", "counter", "Speculated sequences verified (one per "
                       "sequence and step).", [("", spec["verifications"])])
                metric("jaxserve_spec_proposed_tokens_total", "counter", "Proposed tokens verified.",
                       [("", spec["proposed_tokens"])])
                metric("jaxserve_spec_accepted_tokens_total", "counter", "Proposed tokens accepted.",
                       [("", spec["accepted_tokens"])])
                for name, key, help_text in (
                        ("jaxserve_spec_acceptance_rate", "acceptance_rate", "Accepted / proposed tokens."),
                        ("jaxserve_spec_mean_accepted_length", "mean_accepted_length",
                         "Tokens emitted per verification (accepted proposals + 1)."),
                        ("jaxserve_spec_proposals_per_step", "proposals_per_step",
                         "Proposed tokens per engine step.")):
                    metric(name, "gauge", help_text, [("", spec[key] or 0.0)])
            for h in (self.ttft, self.tpot, self.e2e):
                lines.extend(h.render())
        return "\n".join(lines) + "\n"


def parse_prometheus(text: str) -> dict[str, float]:
    """``{'name{labels}': value}`` for every sample line (for tests and tools)."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples
