"""architectures/count_aliases.py is transformers' own answer, written down: checked against the installed
transformers for every model type it knows (the table is what spares a frankenmerge importing it)."""

import pytest

from mergeng.architectures import config_layers
from mergeng.architectures.count_aliases import COUNT_ALIASES, WITHOUT_ALIAS, WRITTEN_FROM


def test_the_alias_table_is_what_transformers_says():
    transformers = pytest.importorskip("transformers")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    live = {}
    for model_type in CONFIG_MAPPING_NAMES:
        cls = transformers.CONFIG_MAPPING[model_type]
        live[model_type] = tuple(sorted({v for k, v in getattr(cls, "attribute_map", {}).items() if k == "num_hidden_layers"}))
    table = {t: COUNT_ALIASES.get(t, ()) for t in live if t in COUNT_ALIASES or t in WITHOUT_ALIAS}
    wrong = {t: (table[t], live[t]) for t in table if table[t] != live[t]}
    assert not wrong, f"count_aliases.py ({WRITTEN_FROM}) disagrees with transformers {transformers.__version__}: {wrong}"
    if f"transformers {transformers.__version__}" == WRITTEN_FROM:  # the table's own version: every type is in it
        missing = sorted(set(live) - set(table))
        assert not missing, f"model types missing from count_aliases.py: {missing}"
        assert not (set(COUNT_ALIASES) | WITHOUT_ALIAS) - set(live)


def test_a_model_type_outside_the_table_is_asked_of_transformers(monkeypatch):
    """A transformers newer than the table: its model types are asked of it, not assumed alias-free."""
    pytest.importorskip("transformers")
    monkeypatch.setattr(config_layers, "WITHOUT_ALIAS", WITHOUT_ALIAS - {"gpt2"})
    monkeypatch.setattr(config_layers, "COUNT_ALIASES", {k: v for k, v in COUNT_ALIASES.items() if k != "gpt2"})
    monkeypatch.setattr(config_layers, "installed_transformers", lambda: "transformers 99.0")
    assert config_layers._count_aliases("gpt2") == {"n_layer"}
    # the table's own transformers: a type it does not know has no aliases there either, and is not imported for
    monkeypatch.setattr(config_layers, "installed_transformers", lambda: WRITTEN_FROM)
    assert config_layers._count_aliases("not_a_model_type") == set()
