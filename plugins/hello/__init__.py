"""The hello plugin: the seed's example, in the original PLUGIN_INFO format."""
