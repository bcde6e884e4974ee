"""A bounded schemathesis pass over every operation of the live server's OpenAPI document: generated requests (the
schema's and its near misses) never get a 5xx, and every answer's status, content type and body are the ones the
document declares (its response schemas: seekling/serve/responses.py). On the real engine (a tiny random model),
so generated tools and response_format schemas really compile, bounded, and really constrain."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks
from test_serve import CORPUS, LiveServer, tiny_model

from seekling.engine import Engine
from seekling.tokenizer import train_tokenizer

CHECKS = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
          checks.response_schema_conformance]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tokenizer = train_tokenizer(CORPUS, vocab_size=300)
    model = tiny_model(tokenizer)
    model.config.max_position_embeddings = 1024
    engine = Engine(model, tokenizer, max_num_seqs=8, block_size=4)
    # Small caps keep each generated request cheap (the bounds are what is tested, not the model).
    live = LiveServer(engine, data_dir=str(tmp_path_factory.mktemp("openapi")), max_tokens_cap=8,
                      max_prompt_tokens=600, grammar_timeout_s=2.0, max_body_bytes=20_000, max_messages=8)
    yield live
    live.close()


@pytest.fixture(scope="module")
def api(server):
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api")


@schema.parametrize()
@settings(max_examples=12, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_operation_answers_what_the_document_says(case, server):
    case.call_and_validate(base_url=server.url, checks=CHECKS, timeout=60)
