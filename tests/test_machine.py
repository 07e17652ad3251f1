"""The CPU name labkit puts next to its figures and uses as the key of tuned block sizes."""

from labkit.machine import cpu_from_cpuinfo, cpu_model

ZEN4, ZEN5 = (f"processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: {family}\nmodel\t\t: {model}\n"
              f"model name\t: AMD EPYC\n\nprocessor\t: 1\ncpu family\t: 99\nmodel name\t: other\n"
              for family, model in ((25, 17), (26, 2)))


def test_one_name_on_two_generations_is_told_apart_by_family_and_model():
    assert cpu_from_cpuinfo(ZEN4) == "AMD EPYC (family 25, model 17)"
    assert cpu_from_cpuinfo(ZEN5) == "AMD EPYC (family 26, model 2)"


def test_a_cpuinfo_without_numbers_or_name():
    assert cpu_from_cpuinfo("processor : 0\nmodel name : Neoverse-N1\n") == "Neoverse-N1"
    assert cpu_from_cpuinfo("processor : 0\nBogoMIPS : 50.00\n") is None
    assert cpu_model()  # whatever this machine is, it has a name
