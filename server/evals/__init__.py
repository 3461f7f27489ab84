"""Evaluation through the server: score items against several models at once (`peftserve eval`,
`POST /v1/evals`). Multiple-choice items are scored by loglikelihood (echo + logprobs on /v1/completions,
as lm-eval's local-completions does), generation items by exact/contains match on a greedy chat answer."""
