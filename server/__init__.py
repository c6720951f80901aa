"""OpenAI-compatible serving of AWQ / AWQ-opt checkpoints over vLLM, with hot swap.

A request passes through, in this order:

- `middleware`: API and admin keys, the body limit, request ids, the access log and request metrics;
- `routes`: the HTTP routes (`routes.openai`, `routes.admin`, `routes.ops`), put together with the error
  handlers and the middleware by `app.create_app`;
- `registry`: served names -> engines, with leases so that swaps and unloads never cut a request short;
- `engines`: one vLLM engine per checkpoint behind vLLM's own OpenAI serving objects, wrapped by
  `engine_observer` for token counts and time to first token.

`metrics` holds the Prometheus metrics, `openai_errors` the OpenAI-shaped error bodies, and
`serve_command` the `lape-awq serve` command line.
"""
