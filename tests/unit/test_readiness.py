"""GET /health/ready's rule: ready once the worker consumes; a down sink does not make it unready."""

from types import SimpleNamespace

from ingest_stream.stream.views import not_ready


def test_not_ready_until_it_joined_its_group_nor_during_a_rebalance_or_table_recovery():
    pipeline = SimpleNamespace(consuming=False)
    app = SimpleNamespace(rebalancing=False, in_recovery=False)
    assert not_ready(app, pipeline) == ["joining the consumer group"]
    pipeline.consuming = True
    assert not_ready(app, pipeline) == []
    app.rebalancing, app.in_recovery = True, True
    assert not_ready(app, pipeline) == ["a rebalance", "table recovery"]
