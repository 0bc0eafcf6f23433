"""Submit a batch from a script: `python examples/submit.py` (with FLUXFLEET_* set, and a worker running)."""

from producer import Client

client = Client.from_env()
job = client.submit(
    ["a red fox in fresh snow", "a lighthouse at dusk", "a steam train on a stone bridge"],
    preset="tiny",
    steps=4,
    width=64,
    height=64,
    seed=1234,
    images_per_prompt=2,
)
status = job.wait(progress=True)
print(f"{status.done} images, {status.failed} failed")
for record in job.results():
    print(record.key, record.seed, record.params.steps, record.location)
