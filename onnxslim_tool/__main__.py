from onnxslim_tool.cli import main

main()
