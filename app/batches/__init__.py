"""OpenAI's Files and Batch APIs on the cluster: stores (files, batches, results), the batch as
a workflow, the line runner, the batch workers and the HTTP routes. Import from the modules:
app.fleet.spec embeds app.batches.settings, so this package must stay cheap to import."""
