"""The scripts and the docs as code: ``launch/`` entry points, benchmarks and experiments at tiny sizes, the README
and docs/ blocks, commands and links, the core without Composer, and the built wheel."""
