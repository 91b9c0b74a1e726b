"""The ML domain: data validation, token counts, pricing, training, evaluation.

Nothing here knows about Slack or storage, and nothing here imports torch at
module level: `import trainers.data` stays fast for the OpenAI-only install.
"""
