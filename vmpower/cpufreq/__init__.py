"""CPU frequency control: driver detection and one backend per scaling driver.

The public surface is the ``CpuFreq`` facade (``open_cpufreq``) and its value types;
the backends (acpi-cpufreq, intel_pstate, amd-pstate[-epp], cppc_cpufreq) and the
simulated sysfs builder (``vmpower.cpufreq.simulate``) live in the submodules.
"""

from vmpower.cpufreq.core import CpuFreq, open_cpufreq
from vmpower.cpufreq.model import Capabilities, CpuState

__all__ = ["Capabilities", "CpuFreq", "CpuState", "open_cpufreq"]
