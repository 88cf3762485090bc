from mergebuild.cli import run

run()
