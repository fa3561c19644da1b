# SPDX-License-Identifier: GPL-2.0-or-later
from hostpool import network, pool_on_hosts  # noqa: F401  (the fixtures of tests on several hosts)
