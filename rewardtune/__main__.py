from rewardtune.cli import main

main()
