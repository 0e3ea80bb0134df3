from mllama_export.cli import main

main()
