{
  "targets": [
    {
      "target_name": "poolscope_adapter",
      "sources": ["src/sender.c"],
      "cflags": ["-Wall", "-Wextra", "-O2"],
      "defines": ["_GNU_SOURCE"]
    }
  ]
}
