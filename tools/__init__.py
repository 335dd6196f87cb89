"""Development tools, not shipped with the pipeline: dvc.yaml's code dependencies, the
import graph, the lock files."""
