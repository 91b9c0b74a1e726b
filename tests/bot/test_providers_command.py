"""/finetune providers: where runs can train, told only to the one who asks."""

from __future__ import annotations

from tests.trainers.test_providers import GOOD


def test_finetune_providers_lists_the_configured_ones_to_the_asker_alone(make_bot, tmp_path):
    path = tmp_path / "providers.toml"
    path.write_text(GOOD)
    bot = make_bot(providers_file=path)
    status, body = bot.command("providers", user_id="UR")
    assert status == 200 and body["response_type"] == "ephemeral"
    text = body["text"]
    assert "• openai" in text and "• local" in text
    assert "• acme — openai-compatible at http://127.0.0.1:9/v1" in text
    assert "acme-8b ($0.5/1M, 32,768 tokens)" in text and "• tog — together" in text
