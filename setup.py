"""Packaging glue that pyproject.toml cannot express: defense_configs/ and patches/ sit at the top of the
repository, where BackdoorBench users look for them, and ship inside the package so an installed copy finds
them without a checkout."""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["backdoorbench_gic", "backdoorbench_gic.*"])
    + ["backdoorbench_gic.defense_configs", "backdoorbench_gic.patches"],
    package_dir={
        "backdoorbench_gic.defense_configs": "defense_configs",
        "backdoorbench_gic.patches": "patches",
    },
    package_data={
        "backdoorbench_gic.defense_configs": ["**/*.yaml"],
        "backdoorbench_gic.patches": ["**/*.py", "**/*.yaml", "**/*.patch", "**/*.md"],
    },
    include_package_data=False,
)
