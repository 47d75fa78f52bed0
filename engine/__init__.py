"""The merge machinery, independent of any merge method: recipe, sources, graph, scheduler, executor, writer."""
