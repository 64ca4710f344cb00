def markdown(results, modules):
    return "\n\n".join(m.markdown(results["benchmarks"][n]) for n, m in modules.items())
def plot(results, path):
    pass
