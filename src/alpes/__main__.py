from alpes.cli import app

app(prog_name="alpes")
