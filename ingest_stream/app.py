"""The module `faust -A ingest_stream.app worker` loads: the app built from the environment."""

from ingest_stream.config import Settings
from ingest_stream.stream.app import create_app

app = create_app(Settings.from_env())
