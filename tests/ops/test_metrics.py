"""/metrics against the real server: exact deltas as requests happen, bounded adapter labels, gauges."""

from __future__ import annotations

import httpx

from tests.ops.conftest import SERVER, scrape, series, value, wait_for
from tests.server_utils import live_server

ROUTE = "/v1/completions"


def test_counters_move_by_exact_deltas(tiny_model: str, lora_dir: str) -> None:
    with live_server(model=tiny_model, adapter=[f"a={lora_dir}"], **SERVER) as srv, srv.client() as c:
        before = scrape(c)
        assert value(before, "peftserve_kv_blocks_total") == 64
        assert value(before, "peftserve_kv_blocks_used") == 0
        assert value(before, "peftserve_engine_alive") == 1

        r = c.post(ROUTE, json={"prompt": "hello there", "max_tokens": 7, "ignore_eos": True})
        assert r.status_code == 200, r.text
        prompt_tokens = r.json()["usage"]["prompt_tokens"]
        r = c.post(ROUTE, json={"model": "a", "prompt": [1, 2, 3], "max_tokens": 5, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert c.post(ROUTE, json={"model": "a", "prompt": [1], "max_tokens": 99999}).status_code == 400
        after = scrape(c)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("peftserve_http_requests_total", route=ROUTE, status="200", adapter="base") == 1
    assert delta("peftserve_http_requests_total", route=ROUTE, status="200", adapter="a") == 1
    assert delta("peftserve_http_requests_total", route=ROUTE, status="400", adapter="a") == 1
    assert delta("peftserve_http_requests_total", route="/metrics", status="200", adapter="none") == 1
    assert delta("peftserve_prompt_tokens_total", adapter="base") == prompt_tokens
    assert delta("peftserve_prompt_tokens_total", adapter="a") == 3
    assert delta("peftserve_generation_tokens_total", adapter="base") == 7
    assert delta("peftserve_generation_tokens_total", adapter="a") == 5
    assert delta("peftserve_time_to_first_token_seconds_count", adapter="base") == 1
    assert delta("peftserve_e2e_request_latency_seconds_count", adapter="a") == 1
    assert delta("peftserve_inter_token_latency_seconds_count") == 6 + 4
    assert delta("peftserve_sequences_finished_total", finish_reason="length") == 2
    assert delta("peftserve_adapter_loads_total", tier="device") == 1
    assert delta("peftserve_adapter_evictions_total", tier="device") == 0
    assert delta("peftserve_adapter_load_seconds_count") == 1
    assert value(after, "peftserve_adapters_resident", tier="device") == 1
    assert value(after, "peftserve_adapters_resident", tier="cpu") == 1
    assert value(after, "peftserve_adapters_resident", tier="disk") == 1
    info = srv.state.engine.info
    assert value(after, "peftserve_adapter_slots_total") == info.max_adapters
    # the pool holds what 8 adapters of --max-rank took before paging; "a" (resident, idle) holds its own pages
    assert value(after, "peftserve_adapter_pages_total") == info.adapter_pages == 8 * 64 // info.adapter_page_rank
    assert 0 < value(after, "peftserve_adapter_pages_used") < info.adapter_pages
    # nothing is left running: the KV cache and the adapter slot are back to their baselines
    assert value(after, "peftserve_kv_blocks_used") == 0
    assert value(after, "peftserve_adapter_slots_in_use") == 0
    assert value(after, "peftserve_num_requests_running") == 0
    assert value(after, "peftserve_num_requests_waiting") == 0


def test_gauges_sample_the_engine_while_a_request_runs(tiny_model: str) -> None:
    with live_server(model=tiny_model, **SERVER) as srv, srv.client() as c:
        body = {"prompt": [5] * 40, "max_tokens": 150, "ignore_eos": True, "stream": True}
        with c.stream("POST", ROUTE, json=body) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: {"))
            during = scrape(c)
            for _ in lines:
                pass
        assert value(during, "peftserve_num_requests_running") == 1
        assert value(during, "peftserve_kv_blocks_used") >= 3  # 40 prompt tokens in 16-token blocks
        wait_for(lambda: value(scrape(c), "peftserve_kv_blocks_used") == 0, what="KV blocks freed")


def test_adapter_labels_fold_into_other_and_rebalance(tiny_model: str, lora_dir: str) -> None:
    adapters = [f"{n}={lora_dir}" for n in ("a", "b", "c")]
    with live_server(model=tiny_model, adapter=adapters, metrics_max_adapters=2, **SERVER) as srv, \
            srv.client() as c:

        def ask(model: str | None) -> httpx.Response:
            return c.post(ROUTE, json={"prompt": [1, 2], "max_tokens": 2, **({"model": model} if model else {})})

        for m in ("a", "b", "c", None):
            assert ask(m).status_code == 200
        assert ask("no-such-adapter").status_code == 404
        s = scrape(c)
        labels = {d["adapter"] for d in series(s, "peftserve_http_requests_total")}
        assert labels == {"a", "b", "other", "base"}, labels  # this scrape counts after it renders
        assert value(s, "peftserve_http_requests_total", route=ROUTE, status="200", adapter="other") == 1
        assert value(s, "peftserve_http_requests_total", route=ROUTE, status="404", adapter="other") == 1
        assert value(s, "peftserve_generation_tokens_total", adapter="other") == 2
        assert "no-such-adapter" not in labels

        # c becomes by far the busiest: at the next scrape it takes the label of a quiet one
        for _ in range(4):
            assert ask("c").status_code == 200
        scrape(c)
        assert ask("c").status_code == 200
        s = scrape(c)
        kept = {d["adapter"] for d in series(s, "peftserve_generation_tokens_total")}
        assert "c" in kept and len(kept - {"base", "other"}) == 2, kept
        assert value(s, "peftserve_http_requests_total", route=ROUTE, status="200", adapter="c") == 1
        assert value(s, "peftserve_http_requests_total", route=ROUTE, status="200", adapter="other") == 5
        assert srv.state.metrics.labels.labelled == kept - {"base", "other"}
