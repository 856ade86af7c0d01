"""Evaluators: accuracy of classifiers, k-NN, linear probing and fine-tuning of any backbone."""
