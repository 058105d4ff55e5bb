from cfmjax.cli import run

run()
